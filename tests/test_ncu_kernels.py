"""benchmarks/ncu_kernels.py's table mode: an ncu --csv --page details output (program output and ncu's own
lines before the header) becomes one row per launch, in ID order, paired with the run mode's labels, with
instructions per weight byte from the labelled shape; a label count that does not match leaves rows
unlabelled rather than mislabelled."""
import importlib.util
import json
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "ncu_kernels", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_kernels.py")
nk = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(nk)

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _metric(launch_id, kernel, grid, name, unit, value):
    return (f'"{launch_id}","1","python3","h","{kernel}","1","14","(128, 1, 1)","{grid}","0","9.0","S",'
            f'"{name}","{unit}","{value}"')


def _csv(labels):
    lines = [f"ncu-label {label}" for label in labels] + ["==PROF== Disconnected from process 1", HEADER]
    # launch 1 listed first in the file, launch 0 second: rows must come out in ID order
    for launch_id, kernel, grid, duration, instructions in ((1, "nvfp4_gemv", "(896, 1, 1)", "67,010", "3,000,000"),
                                                            (0, "w4a16_gemv", "(1792, 1, 1)", "36,480", "1,000,000")):
        lines += [_metric(launch_id, kernel, grid, "Duration", "ns", duration),
                  _metric(launch_id, kernel, grid, "Executed Instructions", "inst", instructions),
                  _metric(launch_id, kernel, grid, "Theoretical Occupancy", "%", "31.25")]
    return "\n".join(lines) + "\n"


def test_launches_come_out_in_id_order_with_their_labels_and_instructions_per_byte(tmp_path):
    src = tmp_path / "ncu.csv"
    src.write_text(_csv(["w4a16 8b.o M=1 call warmup", "nvfp4 8b.o M=1 call 0"]))
    nk.table(str(src), str(tmp_path / "t"))
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["kernel"] for r in rows] == ["w4a16_gemv", "nvfp4_gemv"]
    assert [r["label"] for r in rows] == ["w4a16 8b.o M=1 call warmup", "nvfp4 8b.o M=1 call 0"]
    md = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("|")]
    assert "| 36.48 |" in md[2] and "| 67.01 |" in md[3]
    bytes_o = 4096 * 4096 / 2                               # 8b.o: N = K = 4096, 4-bit codes
    assert f"| {1e6 * 32 / bytes_o:.2f} |" in md[2] and f"| {3e6 * 32 / bytes_o:.2f} |" in md[3]


def test_a_label_count_that_does_not_match_leaves_rows_unlabelled(tmp_path, capsys):
    src = tmp_path / "ncu.csv"
    src.write_text(_csv(["w4a16 8b.o M=1 call 0"]))
    nk.table(str(src), str(tmp_path / "t"))
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["label"] for r in rows] == ["", ""]
    assert "1 labelled calls, 2 profiled launches" in capsys.readouterr().out
    table_lines = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("|")]
    assert table_lines[2].endswith("| n/a |")


def test_labels_of_calls_that_launch_no_profiled_kernel_can_be_dropped(tmp_path):
    src = tmp_path / "ncu.csv"
    src.write_text(_csv(["w4a16 8b.o M=1 call 0", "fp8_block 8b.o M=1 call 0", "nvfp4 8b.o M=1 call 0"]))
    nk.table(str(src), str(tmp_path / "t"), unlaunched=r"^fp8_block .* M=1 ")
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["label"] for r in rows] == ["w4a16 8b.o M=1 call 0", "nvfp4 8b.o M=1 call 0"]


def test_a_duration_in_an_unknown_unit_is_an_error_naming_it(tmp_path):
    src = tmp_path / "ncu.csv"
    src.write_text(_csv(["w4a16 8b.o M=1 call 0", "nvfp4 8b.o M=1 call 0"]).replace('"Duration","ns"',
                                                                                 '"Duration","cycle"'))
    with pytest.raises(ValueError, match="Duration in unit 'cycle'"):
        nk.table(str(src), str(tmp_path / "t"))


SASS_HEADER = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"'


def test_sass_mode_counts_executed_instructions_per_opcode_per_weight_word(tmp_path):
    """Modifiers and predicates are dropped from the opcode; rows without a count are skipped; per word is
    32 threads x warp instructions over the layer's int32 words of codes."""
    src = tmp_path / "sass.csv"
    src.write_text("\n".join(["ncu-label w4a16 8b.o M=1 call 0", '"Kernel Name","w4a16_gemv",', SASS_HEADER,
                              '"0x10","LOP3.LUT R1, R2, 0xf000, R3, 0xf8, !PT","5","4096"',
                              '"0x20","@P0 LOP3.LUT R1, R2, 0xf, RZ, 0xc0, !PT","1","1024"',
                              '"0x30","FFMA R4, R5, R6, R4","7","2,048"',
                              '"0x40","","0",""']) + "\n")
    kernel, mix = nk.sass_mix(src.read_text())
    assert kernel == "w4a16_gemv" and mix == {"LOP3": 5120, "FFMA": 2048}
    nk.sass_table([(str(src), "w4a16 8b.o test")], str(tmp_path / "s"), card="card")
    words = 4096 * 4096 / 2 / 4
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["per_word"] == {"LOP3": round(5120 * 32 / words, 2), "FFMA": round(2048 * 32 / words, 2)}
    md = (tmp_path / "s.md").read_text()
    assert "| w4a16 8b.o test |" in md and f"| LOP3 | {round(5120 * 32 / words, 2)} |" in md


def test_sass_mode_refuses_output_without_a_source_table(tmp_path):
    src = tmp_path / "sass.csv"
    src.write_text('"Kernel Name","w4a16_gemv",\n')
    with pytest.raises(ValueError, match="no source table"):
        nk.sass_mix(src.read_text())
