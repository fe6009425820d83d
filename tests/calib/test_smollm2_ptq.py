"""The embedded SmolLM2-135M: GPTQ and AWQ (INT4 group 64, layer-by-layer calibration on a little WikiText-2)
beat round to nearest. The full table with the issue's gates is benchmarks/ptq_ppl.py's committed result."""
import pathlib

import pytest

import jaxq

pytestmark = pytest.mark.slow
DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def smol():
    model = jaxq.load("smollm2-135m", dtype="bfloat16")
    return model, (DATA / "test.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("recipe", ["w4a16_gptq", "w4a16_awq"])
def test_calibrated_int4_beats_round_to_nearest(smol, recipe):
    model, test = smol
    kw = dict(calib_data=DATA / "valid.txt", calib_size=8, calib_seq=256, group_size=64, progress=False)
    q, report = jaxq.quantize(model, recipe, return_report=True, **kw)
    rtn = jaxq.quantize(model, jaxq.get_recipe(recipe, algorithm="max"), **kw)
    ppl, ppl_rtn = (jaxq.perplexity(m, test, 512, 2) for m in (q, rtn))
    assert ppl < ppl_rtn - 1.0, (ppl, ppl_rtn)
    assert report.host_peak_rise is None or report.host_peak_rise < 2 * report.model_bf16_bytes
