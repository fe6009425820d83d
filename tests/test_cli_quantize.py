"""`jaxq quantize` and `jaxq eval` on a tiny random Llama checkpoint with a word-level tokenizer: quantize with
calibration, export, load back, evaluate; user errors print one line and exit 1."""
import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import jaxq
from jaxq.cli import main
from jaxq.loaded_model import random_model
from jaxq.nn.quantized_weight import QuantizedWeight

WORDS = [f"w{i}" for i in range(120)]
TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = random_model(TINY, "bfloat16", seed=4).replace(tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok))
    jaxq.export(model, root / "base", format="hf", progress=False)
    text = root / "text.txt"
    text.write_text(" ".join(np.random.RandomState(0).choice(WORDS, 2000)))
    return root, text


def test_quantize_export_and_eval(checkpoint, capsys):
    root, text = checkpoint
    out = root / "w4a16_gptq"
    assert main(["quantize", "--model", str(root / "base"), "--quant", "w4a16_gptq", "--group-size", "32",
                 "--calib-data", str(text), "--calib-size", "4", "--calib-seq", "64", "--export-dir", str(out),
                 "--export-format", "compressed-tensors"]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 4 x 64 tokens, layer by layer" in printed and "x the bf16 model" in printed
    loaded = jaxq.load(out)
    assert loaded.quantization.recipe_for("model.layers.0.mlp.down_proj").name == "w4a16_gptq"
    assert main(["eval", "--model", str(out), "--data", str(text), "--window", "64", "--max-windows", "3"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ") and "the first 3 non-overlapping windows of 64 tokens" in line
    assert np.isfinite(float(line.split()[1]))


def test_awq_to_compressed_tensors_quantizes_with_the_foldable_fold(checkpoint, capsys):
    """compressed-tensors stores no pre_quant_scale: the CLI quantizes AWQ recipes with fold "foldable", says so,
    and the export loads back (GQA model: o_proj not smoothed) with no pre_quant_scale and zero points."""
    root, text = checkpoint
    out = root / "w4a16_awq_asym"
    assert main(["quantize", "--model", str(root / "base"), "--quant", "w4a16_awq", "--asymmetric", "--group-size",
                 "32", "--calib-data", str(text), "--calib-size", "4", "--calib-seq", "64", "--export-dir", str(out),
                 "--export-format", "compressed-tensors"]) == 0
    assert "AWQ fold 'foldable' for compressed-tensors" in capsys.readouterr().out
    weights = [w for w in jax.tree.leaves(jaxq.load(out).params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
               if isinstance(w, QuantizedWeight)]
    assert len(weights) == 14
    assert all(w.pre_quant_scale is None and w.weight.zero is not None for w in weights)


def test_user_errors_exit_1_with_one_line(checkpoint, capsys, tmp_path):
    root, text = checkpoint
    base = ["quantize", "--model", str(root / "base"), "--export-dir", str(tmp_path / "out"), "--calib-size", "4",
            "--calib-seq", "64"]
    assert main(base + ["--quant", "w4a16_awq", "--calib-data", str(text)]) == 1  # K = 64: no groups of 128
    assert "layer model.layers.0.self_attn.q_proj" in capsys.readouterr().err
    assert main(base + ["--quant", "w4a8_awq", "--group-size", "32", "--calib-data", str(text), "--export-format",
                        "compressed-tensors"]) == 1
    printed = capsys.readouterr()
    assert "recipe 'w4a8_awq' (int4 weights, activation 'fp8_static') has no compressed-tensors layout" in printed.err
    assert printed.out == ""  # refused before quantizing
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(base + ["--quant", "fp8", "--calib-data", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main(["eval", "--model", str(root / "base"), "--data", str(tmp_path / "missing.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err
