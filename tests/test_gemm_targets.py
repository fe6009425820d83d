"""benchmarks/gemm_targets.py: the targets computed from summary rows (ratios at the same point, geomean or
minimum, the copy-bandwidth fraction), shapes without rows reported, and no verdict without data."""
import importlib.util
import json
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "gemm_targets", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_targets.py")
gt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gt)

CARD = "H100"


def _row(recipe, shape, m, us, pct=None, device_us=None):
    return {"recipe": recipe, "shape": shape, "M": m, "us": us, "pct_copy_bw": pct, "card": CARD,
            "device_us": device_us}


def _target(name):
    return next(t for t in gt.TARGETS if t.name.startswith(name))


def test_ratio_targets_use_the_same_point_and_aggregate():
    rows = [_row("xla_bf16", "8b.qkv", 1, 32.0), _row("w4a16", "8b.qkv", 1, 10.0),        # 3.2x
            _row("xla_bf16", "8b.o", 1, 29.0), _row("w4a16", "8b.o", 1, 10.0),            # 2.9x
            _row("w4a16", "8b.down", 1, 10.0)]                                           # no baseline row
    r = gt.evaluate(rows, _target("w4a16 M=1: >= 3.0x XLA bf16"))
    assert r["points"] == 2 and r["value"] == pytest.approx((3.2 * 2.9) ** 0.5, abs=1e-3)
    assert r["met"] and r["worst"] == pytest.approx(2.9)
    assert "8b.down" in r["missing"] and "70b.qkv" in r["missing"] and "8b.qkv" not in r["missing"]


def test_min_targets_fail_on_one_slow_point():
    rows = []
    for m, ratio in ((256, 1.1), (1024, 0.94), (4096, 1.3)):
        rows += [_row("xla_bf16", "8b.gate_up", m, 100.0 * ratio), _row("w4a16", "8b.gate_up", m, 100.0)]
    r = gt.evaluate(rows, _target("w4a16 every M >= 256"))
    assert r["value"] == pytest.approx(0.94) and r["met"] is False


def test_copy_bandwidth_target_and_no_data():
    rows = [_row("nvfp4", "8b.qkv", 1, 5.0, pct=80.0), _row("nvfp4", "8b.qkv", 16, 6.0, pct=76.0)]
    assert gt.evaluate(rows, _target("nvfp4 M=1,16"))["met"] is True
    rows[1]["pct_copy_bw"] = 50.0
    assert gt.evaluate(rows, _target("nvfp4 M=1,16"))["met"] is False
    empty = gt.evaluate([], _target("w4a8 M=256"))
    assert empty["met"] is None and empty["points"] == 0


def test_main_writes_the_table(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([_row("xla_bf16", "8b.qkv", 4096, 300.0), _row("fp8_block", "8b.qkv", 4096, 200.0)]))
    gt.main(["--summary", str(summary), "--out", str(tmp_path)])
    md = (tmp_path / "gemm_targets.md").read_text()
    assert "| fp8_block M=4096: >= 1.4x XLA bf16 | 1.5 | 1.5 | 1 | met |" in md
    assert len(json.loads((tmp_path / "gemm_targets.json").read_text())[CARD]) == len(gt.TARGETS)


def test_each_card_is_judged_on_its_own_rows():
    """2.0x on one card and 1.0x on the other: two verdicts, not one geomean of 1.41x."""
    rows = [_row("xla_bf16", "8b.qkv", 4096, 300.0), _row("fp8_block", "8b.qkv", 4096, 150.0),
            {**_row("xla_bf16", "8b.qkv", 4096, 200.0), "card": "H200"},
            {**_row("fp8_block", "8b.qkv", 4096, 200.0), "card": "H200"}]
    results, md = gt.table(rows)
    index = [t.name for t in gt.TARGETS].index(_target("fp8_block M=4096: >= 1.4x").name)
    assert results[CARD][index]["value"] == pytest.approx(2.0) and results[CARD][index]["met"]
    assert results["H200"][index]["value"] == pytest.approx(1.0) and results["H200"][index]["met"] is False
    assert f"## {CARD}: wall clock" in md and "## H200: device time" in md


def test_a_ratio_pairs_rows_of_one_run_only():
    """A baseline row re-measured in a later run does not divide an older recipe row: the point is missing."""
    rows = [{**_row("xla_bf16", "8b.qkv", 4096, 300.0), "run": "2026-11-28T09:40"},
            {**_row("fp8_block", "8b.qkv", 4096, 200.0), "run": "2026-11-28T08:29"},
            {**_row("xla_bf16", "8b.o", 4096, 300.0), "run": "2026-11-28T08:29"},
            {**_row("fp8_block", "8b.o", 4096, 200.0), "run": "2026-11-28T08:29"}]
    r = gt.evaluate(rows, _target("fp8_block M=4096: >= 1.4x"))
    assert r["points"] == 1 and r["value"] == pytest.approx(1.5) and "8b.qkv" in r["missing"]


def test_a_rows_own_same_run_speedup_is_its_wall_clock_ratio():
    """gemm.py's speedup_vs_<baseline> (timed in the row's own run) is the wall-clock ratio even where the
    summary's baseline row is from a later run; on device time, rows of different runs give no point."""
    rows = [{**_row("xla_bf16", "8b.qkv", 4096, 300.0, device_us=280.0), "run": "2026-11-28T09:40"},
            {**_row("fp8_block", "8b.qkv", 4096, 250.0, device_us=200.0), "run": "2026-11-28T08:29",
             "speedup_vs_xla_bf16": 1.12}]
    target = _target("fp8_block M=4096: >= 1.4x")
    assert gt.evaluate(rows, target)["value"] == pytest.approx(1.12)
    assert gt.evaluate(gt.on_device_time(rows), target)["points"] == 0


def test_device_time_view_uses_the_rows_device_time_only():
    rows = [_row("xla_bf16", "8b.qkv", 64, 30.0, device_us=25.0), _row("w4a16", "8b.qkv", 64, 30.0, device_us=12.5),
            _row("w4a16", "8b.qkv", 1, 20.0, pct=30.0, device_us=10.0),
            _row("w4a16", "8b.o", 1, 20.0, pct=30.0),                                   # wall time only
            _row("tinygemm", "8b.qkv", 1, 15.0), _row("w4a16", "8b.qkv", 16, 10.0, pct=40.0, device_us=10.0)]
    device = gt.on_device_time(rows)
    assert len(device) == 5 and {r["shape"] for r in device} == {"8b.qkv"}
    m64 = gt.evaluate(device, _target("w4a16 M=64"))
    assert m64["value"] == pytest.approx(2.0) and m64["met"]                    # 25 / 12.5; wall: 1.0x
    assert gt.evaluate(rows, _target("w4a16 M=64"))["met"] is False
    copy = gt.evaluate(device, _target("w4a16 M=1,16"))                          # 30 % x 20 / 10, 40 % x 1
    assert copy["points"] == 2 and copy["value"] == pytest.approx((0.6 * 0.4) ** 0.5, abs=1e-3)
    tiny = gt.evaluate(device, _target("w4a16 M=1: >= 1.4x tinygemm"))           # graph-replayed: as timed
    assert tiny["points"] == 1 and tiny["value"] == pytest.approx(1.5)            # 15 / 10 (wall: 0.75x)
    assert gt.evaluate(rows, _target("w4a16 M=1: >= 1.4x tinygemm"))["value"] == pytest.approx(0.75)
    results, md = gt.table(rows)
    assert results[CARD][0]["device"]["points"] == 2 and f"## {CARD}: device time" in md


def test_a_partial_rerun_keeps_the_baseline_rows_older_recipe_rows_need():
    """Run B re-measures XLA bf16 and NVFP4 at a point where run A's W4A16 row stays: run A's XLA bf16 row is
    kept for it (and divides it on device time), run A's NVFP4 row is replaced, and a baseline row no older
    row needs is dropped."""
    a, b = "2026-11-28T08:00", "2026-11-28T16:40"
    old = [{**_row("xla_bf16", "8b.qkv", 64, 30.0, device_us=20.0), "run": a},
           {**_row("w4a16", "8b.qkv", 64, 15.0, device_us=10.0), "run": a},
           {**_row("nvfp4", "8b.qkv", 64, 40.0, device_us=30.0), "run": a},
           {**_row("xla_bf16", "8b.o", 64, 30.0, device_us=20.0), "run": a}]
    fresh = [{**_row("xla_bf16", "8b.qkv", 64, 32.0, device_us=24.0), "run": b},
             {**_row("nvfp4", "8b.qkv", 64, 20.0, device_us=12.0), "run": b},
             {**_row("xla_bf16", "8b.o", 64, 31.0, device_us=21.0), "run": b}]
    merged = gt.merge_summary(old, fresh)
    assert sorted((r["recipe"], r["shape"], r["run"]) for r in merged) == sorted(
        [("w4a16", "8b.qkv", a), ("xla_bf16", "8b.qkv", a)] + [(r["recipe"], r["shape"], b) for r in fresh])
    device = gt.on_device_time(merged)
    w4 = gt.evaluate(device, _target("w4a16 M=64: >= 1.8x"))
    assert w4["points"] == 1 and w4["value"] == pytest.approx(2.0)
    of_run_b = {(r["recipe"], r["shape"]): r["us"] for r in device if r["run"] == b}
    assert of_run_b[("xla_bf16", "8b.qkv")] / of_run_b[("nvfp4", "8b.qkv")] == pytest.approx(2.0)
