"""The engine-level profile scripts on a tiny random model on CPU: what they count is exact,
so a figure they report about a GPU run can be trusted to count the same."""

import json
import pathlib

from engine_checks import save_tiny_shape
from script_modules import SCRIPTS
from script_modules import load_script as load


def tiny_config(tmp_path) -> pathlib.Path:
    shape = save_tiny_shape(tmp_path / "tiny.json")
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""\
model: {{name: tiny, dtype: float32}}
checkpoint: {{source: random, random_shape: {shape}}}
cache: {{max_model_len: 256, kv_cache_memory: 4194304}}
scheduler: {{max_num_seqs: 8, max_num_batched_tokens: 64}}
runner: {{token_buckets: [8, 64], seq_buckets: [8], compilation_cache_dir: null}}
""")
    return path


def test_trace_step_prefill_counts_steps_tokens_and_matmul_flops(tmp_path):
    ts = load("trace_step")
    out = tmp_path / "trace.json"
    ts.main(["--config", str(tiny_config(tmp_path)), "--prefill", "--batch", "2", "4",
             "--context", "48", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # 96 prompt tokens in steps of at most 64: 64 + 32; 192 tokens: three steps of 64
    assert [(r["batch"], r["steps"], r["tokens_per_step"]) for r in rows] == \
        [(2, 2, 48.0), (4, 3, 64.0)]
    assert all(r["prefill"] and r["step_ms_unprofiled"] > 0 and r["top_ops_ms"] for r in rows)
    assert all(len(r["tokens_digest"]) == 16 for r in rows)


def test_matmul_flops_per_token_counts_each_layer_weight_once(tmp_path):
    ts = load("trace_step")
    from jaxserve.config import load_config
    from jaxserve.loader import load_model

    loaded = load_model(load_config(tiny_config(tmp_path)), progress=False)
    # hidden 32, intermediate 64, 2 heads and 1 KV head of 16, 2 layers: per layer
    # q 32x32, k and v 32x16, o 32x32, gate and up 32x64, down 64x32
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert ts.matmul_flops_per_token(loaded.params) == 2 * 2 * per_layer


def test_bench_prefill_gemms_times_a_layers_four_matmuls(tmp_path):
    pg = load("bench_prefill_gemms")
    llama8b = json.loads((SCRIPTS.parent / "configs/shapes/llama3-8b.json").read_text())
    assert pg.layer_gemms(llama8b) == {"qkv": (4096, 6144), "o": (4096, 4096),
                                       "gate_up": (4096, 28672), "down": (14336, 4096)}
    out = tmp_path / "gemms.json"
    pg.main(["--shape", str(save_tiny_shape(tmp_path / "tiny.json")), "--tokens", "8",
             "--reps", "1", "--rounds", "1", "--no-torch", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["gemm"] for r in rows] == ["qkv", "o", "gate_up", "down", "layer"]
    assert [(r["k"], r["n"]) for r in rows[:4]] == [(32, 64), (32, 32), (32, 128), (64, 32)]
    assert all(r["xla_us"] > 0 and "torch_us" not in r and r["xla_timed_by"] == "wall"
               and r["xla_kernels"] == [] for r in rows[:4])  # no device timeline on a CPU


def test_bench_offline_counts_each_call_to_the_step_dispatched_before_it():
    bench = load("bench_offline")
    # call 0 dispatches a 2048-token prefill; call 1 waits for it and dispatches a mixed
    # step (prompt rows with decodes); calls 2-3 dispatch decodes of 4 sequences; call 4
    # schedules nothing and waits for the last decode
    kinds = [(2048, 4), (2048, 8), (4, 4), (4, 4), (0, 0)]
    seconds = [0.001, 0.050, 0.048, 0.010, 0.011]
    split = bench.by_step_kind(kinds, seconds)
    assert split["first_call_s"] == 0.001
    assert split["prefill"]["steps"] == 2 and split["prefill"]["tokens"] == 4096
    assert abs(split["prefill"]["seconds"] - 0.098) < 1e-12
    assert split["decode"]["steps"] == 2 and split["decode"]["tokens"] == 8
    assert abs(split["decode"]["seconds"] - 0.021) < 1e-12
    assert abs(split["decode"]["ms_per_step"] - 10.5) < 1e-9


def test_bench_offline_splits_the_run_into_prefill_and_decode_steps(tmp_path):
    bench = load("bench_offline")
    out = tmp_path / "offline.json"
    # 3 prompts of 16 tokens fit one step of 64; each then decodes 3 more tokens
    bench.main(["--config", str(tiny_config(tmp_path)), "--num-requests", "3",
                "--input-len", "16", "--output-len", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    split = result["by_step_kind"]
    assert (split["prefill"]["steps"], split["prefill"]["tokens"]) == (1, 48)
    assert (split["decode"]["steps"], split["decode"]["tokens"]) == (3, 9)
    # every call but the first is counted once: the last one waits for the last decode
    assert result["num_steps"] == 1 + split["prefill"]["steps"] + split["decode"]["steps"]
    counted = split["first_call_s"] + split["prefill"]["seconds"] + split["decode"]["seconds"]
    assert 0 < counted <= result["elapsed_s"]
    # the KV pages the budget holds: 4 MiB over K and V of 2 layers x 16 tokens x 1 head
    # x 16 float32 values
    assert (result["kv_pages"], result["page_size"]) == (4194304 // (2 * 2 * 16 * 16 * 4), 16)
    # the collector's runs in the timed run, by generation (start-up's objects frozen)
    assert set(result["gc"]) == {"gen0", "gen1", "gen2"}
    assert all(g["collections"] >= 0 and 0 <= g["max_ms"] <= g["total_ms"] + 1e-9
               for g in result["gc"].values())


def test_bandwidth_probe_fits_beside_a_warm_engine():
    timing = load("timing")

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gib = 2**30
    # 2 GiB free: a quarter of it, not the 4 GiB asked (an H100 with its KV pages taken)
    assert timing.probe_gib(4.0, Device({"bytes_limit": 70 * gib,
                                         "bytes_in_use": 68 * gib})) == 0.5
    assert timing.probe_gib(4.0, Device({"bytes_limit": 70 * gib, "bytes_in_use": 0})) == 4.0
    assert timing.probe_gib(4.0, Device(None)) == 4.0  # no memory size reported (XLA's VMM)


def test_gc_pauses_counts_the_collections_made_while_open():
    import gc

    timing = load("timing")
    with timing.GcPauses() as pauses:
        gc.collect(1)
        gc.collect(2)
        gc.collect(2)
    gc.collect()  # after the context: not counted
    summary = pauses.summary()
    assert summary["gen1"]["collections"] == 1 and summary["gen2"]["collections"] == 2
    assert summary["gen2"]["max_ms"] <= summary["gen2"]["total_ms"]
    assert pauses._callback not in gc.callbacks


def test_bench_gc_runs_each_setting_in_its_own_process(tmp_path):
    bench = load("bench_gc")
    out = tmp_path / "gc.json"
    bench.main(["--config", str(tiny_config(tmp_path)), "--rounds", "2", "--num-requests", "3",
                "--input-len", "16", "--output-len", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    off, on = result["rows"]
    assert (off["freeze"], on["freeze"]) == ("off", "on")
    assert off["frozen"] == 0 and on["frozen"] > 0  # the child froze its start-up objects
    assert on["tracked_after_warm_up"] > 0 and on["rounds_s"] > 0
    assert set(on["gc"]) == {"gen0", "gen1", "gen2"}
