"""`jaxq check PATH`: exit 0 with OK for a good checkpoint, 1 listing every problem otherwise."""

import shutil


from jaxq.cli import main
from tests.shared_paths import FIXTURES, requires_fixtures

pytestmark = requires_fixtures


def test_good_checkpoint(capsys):
    assert main(["check", str(FIXTURES / "modelopt-nvfp4")]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


def test_bad_checkpoint_lists_its_problems(tmp_path, capsys):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "llmc-w4a16-gptq", path)
    (path / "model.pt").write_bytes(b"")
    config = (path / "config.json").read_text()
    (path / "config.json").write_text(config.replace('"group_size": 128', '"group_size": 64'))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "model.pt: pickle file" in out
    assert "model.layers.0.self_attn.q_proj.weight_scale: has shape [256, 2], expected [256, 4]" in out
    assert out.strip().endswith("problem(s)")
