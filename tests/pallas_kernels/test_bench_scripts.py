"""The kernel benchmarks' --smoke runs: every timing they report comes back, on CPU in
interpret mode (tiny shapes), so a kernel signature change cannot silently blank a column."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from script_modules import load_script as load

from pallas_kernels.paged_attention import ragged_paged_attention_reference


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
        step = row["step"]  # two layers, each layer's output the next one's query
        assert step["layers"] == 2 and step["sets"] == 2 and step["tbps"] > 0, row
        assert step["max_abs_err"] < 1e-2, row
    check = result["prefill_reference_check"]
    assert check["max_abs_err"] < 2e-2 and check["mosaic_max_abs_err"] < 2e-2, check
    (prefill,) = result["prefill"]  # T = 64, two sequences: all three kernels timed
    for kernel in ("pallas", "mosaic", "ragged"):
        assert prefill[kernel]["tflops"] > 0, prefill


@pytest.mark.slow
def test_bench_kernels_decode_only_leaves_prefill_out(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    load("bench_kernels").main(["--smoke", "--decode-only", "--autotune", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["decode"]) == 4
    assert "prefill" not in result and "prefill_reference_check" not in result
    assert result["autotune"]["decode"] and result["autotune"]["prefill"] == []
    printed = capsys.readouterr().out
    assert "paged decode" in printed and "flash prefill" not in printed


def test_bench_kernels_step_layers_fit_the_pool_and_the_target_rows():
    bk = load("bench_kernels")
    plan = bk.PLANS["full"]
    token = 2 * 4 * 128 * 2  # K and V of 4 KV heads, head_dim 128, bf16
    assert bk.step_layers(plan, 32, 2048, 4) == 32  # 134 MB a layer
    assert bk.step_layers(plan, 64, 2048, 8) == (12 << 30) // (64 * 2048 * 2 * token)
    assert bk.step_layers(plan, 256, 32768, 8) == 0  # one layer would not fit twice
    assert bk.step_layers(plan, 8, 8192, 8) == 0  # below the target's batch
    assert bk.step_layers(plan, 32, 512, 8) == 0  # below its context


def test_bench_kernels_target_summary_counts_each_timing():
    bk = load("bench_kernels")
    copy = 3.0

    def row(batch, ctx, full, only, step=None):
        r = {"batch": batch, "context": ctx, "kv_heads": 4, "page_size": 16, "tbps": full,
             "kernel_only": {"tbps": only}}
        if step is not None:
            r["step"] = {"tbps": step}
        return r
    rows = [row(32, 2048, 2.0, 2.2, 2.6), row(64, 8192, 2.7, 2.8, 2.9),
            row(8, 8192, 1.0, 1.0), {"batch": 256, "context": 32768, "skipped": "cap"}]
    lines = bk.target_summary(rows, copy)
    assert lines[0].endswith("rows with B >= 32 and context >= 2048: 2; at 85% of copy "
                             "bandwidth or more:")
    assert lines[1] == "  full call: 1 of 2 timed; missed: B=32 ctx=2048 kvh=4 page=16 (67%)"
    assert lines[2] == "  kernel-only: 1 of 2 timed; missed: B=32 ctx=2048 kvh=4 page=16 (73%)"
    assert lines[3] == "  step, per layer: 2 of 2 timed"


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


@pytest.mark.slow
def test_bench_kv_quant_head_major_probe_reads_the_same_keys(tmp_path):
    """--head-major gives the kernel each (sequence, KV head) pair as a sequence of one KV
    head: the same bytes, checked against the reference on those arguments."""
    out = tmp_path / "kvq.json"
    load("bench_kv_quant").main(["--batch", "2", "--context", "64", "--kv-heads", "2",
                                 "--kv-dtype", "bf16", "fp8", "--head-major",
                                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kv_dtype"], r["layout"]) for r in rows] == [
        ("bf16", "token-major"), ("bf16", "head-major"), ("fp8", "token-major"),
        ("fp8", "head-major")]
    for row in rows:
        assert row["check"]["max_abs_err"] < 1e-2, row
    assert rows[0]["bytes"] == rows[1]["bytes"] and rows[2]["bytes"] == rows[3]["bytes"]
    assert rows[0]["num_kv_splits"] == rows[1]["num_kv_splits"]


def test_bench_kv_quant_head_major_arguments_attend_the_same_keys():
    """The head-major view of a pool (each page's KV heads as pages of their own) with
    as_head_major's arguments gives the same attention as the pool as it is."""
    kvq = load("bench_kv_quant")
    kv_heads, pages, batch, ctx = 4, 12, 3, 48
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((1, pages, kvq.PAGE, kv_heads, kvq.HEAD_DIM)),
                        jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((batch, kvq.Q_HEADS, kvq.HEAD_DIM)), jnp.float32)
    tables = jnp.asarray(rng.permutation(pages)[:batch * 3].reshape(batch, 3), jnp.int32)
    lens = jnp.asarray([ctx, 20, 33], jnp.int32)
    starts = jnp.arange(batch + 1, dtype=jnp.int32)
    head_major = lambda a: jnp.moveaxis(a, 3, 2).reshape(1, pages * kv_heads, kvq.PAGE, 1, -1)
    want = ragged_paged_attention_reference(q, k, v, 0, tables, lens, starts, sm_scale=0.1)
    q2, tables2, lens2, starts2 = kvq.as_head_major(kv_heads, q, tables, lens, starts)
    got = ragged_paged_attention_reference(q2, head_major(k), head_major(v), 0, tables2, lens2,
                                           starts2, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
