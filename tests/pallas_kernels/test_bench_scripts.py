"""The kernel benchmarks' --smoke runs: every timing they report comes back, on CPU in
interpret mode (tiny shapes), so a kernel signature change cannot silently blank a column."""

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_kernels_smoke_times_every_kernel(tmp_path):
    out = tmp_path / "kernels.json"
    load("bench_kernels").main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    decode = result["decode"]
    assert len(decode) == 4  # batches 2 and 3 x contexts 64 and 128
    for row in decode:
        assert row["check"]["max_abs_err"] < 1e-2, row
        assert row["tbps"] > 0, row
        assert row["kernel_only"]["tbps"] > 0, row  # not {"error": ...}
    check = result["prefill_reference_check"]
    assert check["max_abs_err"] < 2e-2 and check["mosaic_max_abs_err"] < 2e-2, check
    (prefill,) = result["prefill"]  # T = 64, two sequences: all three kernels timed
    for kernel in ("pallas", "mosaic", "ragged"):
        assert prefill[kernel]["tflops"] > 0, prefill


@pytest.mark.slow
def test_bench_split_k_smoke_agrees_across_split_counts(tmp_path):
    result = load("bench_split_k").main(["--smoke", "--out", str(tmp_path / "sk.json")])
    rows = result["rows"]
    # two cases x (auto for 512 and 8 programs, auto with all splits run, 2 split counts x
    # 2 stage counts, the Mosaic kernel's auto)
    assert len(rows) == 16
    # 2 KV heads x 4 rows: 256 splits wanted, capped by the 4 blocks of 64 keys; of them
    # 512 // (B x 2) run, and 8 // (B x 2) with the smoke's extra target, at least 2
    assert rows[0]["variant"] == "auto (splits 4, 4 run for 512 programs, stages 2)"
    assert rows[1]["variant"] == "auto (splits 4, 4 run for 8 programs, stages 2)"
    assert rows[2]["variant"] == "auto, all run (splits 4, stages 2)"
    assert rows[7]["variant"] == "mosaic auto (splits 4, block_kv 64, stages 2, consumers 1)"
    assert rows[9]["variant"] == "auto (splits 4, 2 run for 8 programs, stages 2)"
    for row in rows:
        assert row["max_abs_diff"] < 1e-2, row
    assert any(row["max_abs_diff"] > 0 for row in rows)  # the splits did sum differently
    assert json.loads((tmp_path / "sk.json").read_text())["rows"] == rows


@pytest.mark.slow
def test_bench_kv_quant_smoke_times_every_page_dtype(tmp_path):
    out = tmp_path / "kvq.json"
    load("bench_kv_quant").main(["--batch", "2", "--context", "64", "--kv-heads", "2",
                                 "--block-kv", "0", "32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kv_dtype"], r["block_kv_decode"], r["default_tiling"]) for r in rows] == [
        ("bf16", 64, True), ("bf16", 32, False), ("int8", 128, True), ("int8", 32, False),
        ("fp8", 128, True), ("fp8", 32, False)]
    for row in rows:
        assert row["check"]["max_abs_err"] < 1e-2, row
        assert row["time_us"] > 0 and row["vs_bf16"] > 0, row
    # K and V bytes of 2 sequences x 64 tokens x 2 KV heads, plus float32 scales if
    # quantized, plus q and the output
    qo = 2 * 2 * 32 * 128 * 2
    assert rows[0]["bytes"] == 2 * 64 * 2 * 2 * 128 * 2 + qo
    assert rows[4]["bytes"] == 2 * 64 * 2 * 2 * (128 + 4) + qo
