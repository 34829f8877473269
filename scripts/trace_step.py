"""Per-op profile of engine decode steps (jax.profiler), summed by op and by op class.

    python scripts/trace_step.py --config configs/smollm2-135m-cpu.yaml --batch 1 16 \
        --out trace.json

B requests of --context random prompt tokens are prefilled; --steps decode steps run
without the profiler (`step_ms_unprofiled`: the profiler's own cost falls on the host),
then --steps more under `jax.profiler.trace`. The trace's complete events are summed per
name and divided by the steps.
`--quantization` sets model.quantization (int8, fp8, q8_0 weights) over the config's.

On CPU, XLA's executors name each event after its HLO op (`dot.50`,
`dynamic-slice_bitcast_fusion.2`, ...), so the classes below are taken from those names:
  weight copies   dynamic-slice / slice / copy fusions (on CPU: layer weights copied out of
                  the stacked arrays before their matmuls)
  matmuls         dot, the oneDNN/YNNPACK fusions that hold a dot, and the CPU matmul
                  kernel's calls (ffi_call)
  loop            while / conditional bodies' own bookkeeping
  other ops       every other XLA op event
  host            the engine's step() wall time, less the time blocked on the device

On a GPU the trace has a device timeline: the first device's kernels are classed by kernel
name (matmuls, attention, collectives, copies, other fusions), each class with its kernel
count per step and, for matmuls and attention, its floor: the bytes it must read (weights;
the KV cache at the step's context) over the device's bandwidth, measured here (the
better of a copy and a sum over 4 GiB). The host's events (the dispatch thread's XLA
thunks, CUDA launch calls, ...) are listed separately with their counts, which shows what
the host spends per kernel it launches.

Each row also holds `tokens_digest`, a hash of the greedy tokens the steps produced: runs
of one config under other XLA flags (`xla_flags` in the JSON) must give the same digest.
`--temperature`, `--top-k` and `--top-p` make every request sample instead (seed 0), to
profile the sampler's random path.

`--prefill` profiles prefill steps instead: each row's B prompts of --context tokens, one
output token each, are stepped through once unprofiled (first executions) and again, new
prompts of the same lengths, under the profiler; the row is per prefill step, with the
matmuls' rate in TFLOP/s (2 x the layers' matmul weights x the step's tokens, plus the LM
head's rows), to set against a peer's GEMM rate on the same GPU
(`scripts/bench_prefill_gemms.py`).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from engine_runs import (
    abort_all,
    bucket_overrides,
    decode_together,
    digest,
    prefilling,
    step_weight_bytes,
    tokens_digest,
)
from timing import copy_bandwidth, probe_gib, read_bandwidth

from jaxserve.config import QUANTIZATIONS, load_config
from jaxserve.engine.engine import Engine, StepTimes
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model

# XLA op events: an HLO instruction name (letters, '-', '_', '.', digits), no '$' (Python
# frames) and no '::' (runtime internals).
OP = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")
CLASSES = (("weight copies", re.compile(r"^(dynamic-slice|slice|copy)")),
           # ffi_call: the CPU matmul kernel (pallas_kernels/cpu_matmul.py), the only jax.ffi
           # call a CPU step makes
           ("matmuls", re.compile(r"^(dot|ynn_fusion|onednn|custom-call|ffi_call)")),
           ("loop", re.compile(r"^(while|conditional|call)")),
           ("other ops", re.compile(r".")))
# GPU kernels, by kernel name: cuBLAS/cuBLASLt (sm90_xmma_*, nvjet_*, cutlass_*), XLA's own
# GEMM fusions (*gemm*), the Pallas kernels (q8_0_matmul a matmul), NCCL, and XLA's fusions.
GPU_CLASSES = (("matmuls", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|dot|q8_0_matmul", re.I)),
               ("attention", re.compile(r"attention|flash", re.I)),
               # XLA names a collective's kernel after its op (psum_476_0_fusion: an
               # all-reduce); its time includes waiting for the other devices to arrive.
               ("collectives", re.compile(r"nccl|all.?reduce|all.?gather|reduce.?scatter|"
                                          r"psum|ppermute|all.?to.?all", re.I)),
               ("copies", re.compile(r"memcpy|memset|copy", re.I)),
               ("other fusions", re.compile(r".")))


def op_class(name: str) -> str:
    return next(label for label, pattern in CLASSES if pattern.match(name))


def kernel_class(name: str) -> str:
    return next(label for label, pattern in GPU_CLASSES if pattern.search(name))


def trace_steps(engine: Engine, steps: int) -> list[dict]:
    """The complete events of `steps` engine steps, each with its process's name."""
    def run():
        for _ in range(steps):
            engine.step()
    return trace_events(run)


def trace_events(run) -> list[dict]:
    """The complete events of run() under jax.profiler.trace, each with its process's name."""
    directory = tempfile.mkdtemp(prefix="trace-")
    try:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            run()
        path = sorted(glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True))[-1]
        with gzip.open(path) as f:
            data = json.load(f)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [dict(e, process=process.get(e.get("pid"), "")) for e in events
            if e.get("ph") == "X"]


def per_step(events: list[dict], steps: int) -> tuple[dict, dict]:
    """(microseconds per step, events per step), by event name."""
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        total[e["name"]] += e.get("dur", 0) / steps
        count[e["name"]] += 1 / steps
    return total, count


def floors_ms(engine: Engine, kv_tokens: int, bandwidth: float) -> dict:
    """What the step must read on the first device, over the bandwidth: every weight (the
    embedding table only when it is the LM head too) and `kv_tokens` tokens of KV cache."""
    device = jax.devices()[0]
    weights = step_weight_bytes(engine)
    k_pages = engine.runner.state.k_pages
    local = next(s.data for s in k_pages.addressable_shards if s.device == device)
    layers, _, _, kv_heads, head_dim = local.shape
    kv = kv_tokens * layers * 2 * kv_heads * head_dim * local.dtype.itemsize
    return {"matmuls": weights / bandwidth * 1e3, "attention": kv / bandwidth * 1e3}


def first_device(events: list[dict]) -> str | None:
    """The trace process of the first device's kernels; None where the trace has no device
    timeline (CPU)."""
    return min((e["process"] for e in events if "/device:" in e["process"]), default=None)


def summarise_gpu(events: list[dict], steps: int, floors: dict, top_n: int = 25) -> dict:
    """Kernels of the first GPU by class (time, count, floor), and the host's events."""
    device = first_device(events)
    kernels = [e for e in events if e["process"] == device]
    host = [e for e in events if "/device:" not in e["process"]]
    k_ms, k_count = per_step(kernels, steps)
    classes: dict[str, dict] = {}
    for name, us in k_ms.items():
        row = classes.setdefault(kernel_class(name), {"ms": 0.0, "kernels": 0.0})
        row["ms"] += us / 1e3
        row["kernels"] += k_count[name]
    for label, row in classes.items():
        row["ms"], row["kernels"] = round(row["ms"], 3), round(row["kernels"], 1)
        if label in floors:
            row["floor_ms"] = round(floors[label], 3)
            row["floor_share"] = round(floors[label] / row["ms"], 3) if row["ms"] else None
    hlo_ops: dict[str, set] = collections.defaultdict(set)
    for e in kernels:
        hlo_ops[e["name"]].add(e.get("args", {}).get("hlo_op", "?"))
    h_ms, h_count = per_step(host, steps)
    top = lambda ms, n: {name: {"ms": round(us / 1e3, 3), "per_step": round(n[name], 1)}
                         for name, us in sorted(ms.items(), key=lambda kv: -kv[1])[:top_n]}
    return {"device": device,
            "kernels_per_step": round(sum(k_count.values()), 1),
            "kernel_ms": round(sum(k_ms.values()) / 1e3, 3),
            "device_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1]["ms"])),
            "top_kernels": {name: {**row, "hlo_ops": sorted(hlo_ops[name])[:4]}
                            for name, row in top(k_ms, k_count).items()},
            "top_host_events": top(h_ms, h_count)}


def matmul_flops_per_token(params) -> int:
    """2 x the elements of every layer's matmul weights (2-D and up, not the quantization
    scales): a token's matmul FLOPs in the layers of a dense model (an MoE layer's experts
    would all be counted, not the ones a token uses). The embedding and LM head are not
    layers' (the head's rows are counted apart)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = jax.tree_util.keystr(path)
        if re.search(r"layers", key) and leaf.ndim >= 2 and "scale" not in key:
            total += leaf.size
    return 2 * total


def profile_prefill(engine: Engine, batch: int, context: int, rng, top_n: int = 25) -> dict:
    """Prefill steps of `batch` prompts of `context` tokens (one output token each, so no
    decode rides along), per step: their kernels, and the matmuls' TFLOP/s. A round is the
    steps until every prompt is computed, then the step that hands the tokens out; its
    wall time is divided by the prefill steps."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True, seed=0, temperature=0.0)

    def prefill_round(prefix: str) -> tuple[int, float, list[int]]:
        """(prefill steps, seconds, each prompt's first token in prompt order)"""
        for i in range(batch):
            engine.add_request(rng.integers(3, vocab, context).tolist(), params,
                               f"{prefix}{i}")
        t, steps, first = time.perf_counter(), 0, {}
        while prefilling(engine):
            first.update((o.request_id, o.token_ids) for o in engine.step() if o.token_ids)
            steps += 1
        while engine.has_unfinished():
            first.update((o.request_id, o.token_ids) for o in engine.step() if o.token_ids)
        return steps, time.perf_counter() - t, [tok for i in range(batch)
                                                 for tok in first[f"{prefix}{i}"]]

    prefill_round(f"p{batch}-warm-")  # first executions
    steps, seconds, _ = prefill_round(f"p{batch}-")
    traced = []
    events = trace_events(lambda: traced.append(prefill_round(f"p{batch}-traced-")))
    if traced[0][0] != steps:
        raise RuntimeError(f"the traced prefill of {batch} x {context} tokens took "
                           f"{traced[0][0]} steps, the untraced one {steps}")
    tokens = batch * context / steps
    flops = (matmul_flops_per_token(engine.runner.params) * tokens
             + 2 * batch / steps * engine.model_config.hidden_size
             * engine.model_config.vocab_size)
    row = {"batch": batch, "context": context, "prefill": True, "steps": steps,
           "tokens_per_step": round(tokens, 1),
           "tokens_digest": digest(traced[0][2]),
           "matmul_tflop_per_step": round(flops / 1e12, 3),
           "step_ms_unprofiled": round(seconds / steps * 1e3, 3),
           "step_ms": round(traced[0][1] / steps * 1e3, 3)}
    if first_device(events):
        row.update(summarise_gpu(events, steps, {}, top_n))
        matmul = row["device_classes"].get("matmuls", {}).get("ms")
        if matmul:
            row["matmul_tflops"] = round(flops / (matmul * 1e-3) / 1e12, 1)
        row["step_tflops_unprofiled"] = round(flops / (row["step_ms_unprofiled"] * 1e-3)
                                              / 1e12, 1)
    else:
        ms, _ = per_step(events, steps)
        row["top_ops_ms"] = {n: round(us / 1e3, 3) for n, us in
                             sorted(ms.items(), key=lambda kv: -kv[1])[:top_n] if OP.match(n)}
    return row


def profile(engine: Engine, batch: int, context: int, steps: int, rng,
            bandwidth: float | None, top_n: int = 25, sampling: dict | None = None) -> dict:
    vocab = engine.model_config.vocab_size
    # Long enough that the first prompts are still decoding when the last prefill ends.
    params = SamplingParams(max_tokens=engine.config.cache.max_model_len - context,
                            ignore_eos=True, seed=0, **(sampling or {"temperature": 0.0}))
    prompts = [rng.integers(3, vocab, context).tolist() for _ in range(batch)]
    decode_together(engine, prompts, params, f"b{batch}-")
    for _ in range(steps):  # the same steps without the profiler, whose cost is the host's
        engine.step()
    plain = engine.step_times.per_step_ms()
    engine.step_times = StepTimes()
    running = engine.scheduler.running
    kv_tokens = sum(r.num_tokens for r in running) + len(running) * steps // 2
    events = trace_steps(engine, steps)
    times = engine.step_times.per_step_ms()
    step_ms = times["host_ms"] + times["wait_ms"]
    row = {"batch": batch, "context": context, "steps": steps,
           "tokens_digest": tokens_digest(running),
           "mean_kv_tokens": round(kv_tokens / max(len(running), 1)),
           "step_ms_unprofiled": round(plain["host_ms"] + plain["wait_ms"], 3),
           "host_ms_unprofiled": round(plain["host_ms"], 3),
           "step_ms": round(step_ms, 3), "host_ms": round(times["host_ms"], 3),
           "phases_ms": {k: round(v, 3) for k, v in times.items()}}
    if first_device(events):
        row.update(summarise_gpu(events, steps, floors_ms(engine, kv_tokens, bandwidth),
                                top_n))
    else:
        ms, _ = per_step(events, steps)
        ops = {n: us for n, us in ms.items() if OP.match(n)}
        classes: collections.Counter[str] = collections.Counter()
        for name, us in ops.items():
            classes[op_class(name)] += us / 1e3
        row["classes_ms"] = {k: round(v, 3) for k, v in classes.most_common()}
        row["top_ops_ms"] = {n: round(us / 1e3, 3) for n, us in
                             sorted(ops.items(), key=lambda kv: -kv[1])[:15]}
    abort_all(engine)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kv-cache-memory", type=float, default=None,
                    help="GiB of KV pages (default: the config's)")
    ap.add_argument("--token-buckets", type=int, nargs="+", default=None)
    ap.add_argument("--seq-buckets", type=int, nargs="+", default=None)
    ap.add_argument("--top", type=int, default=25,
                    help="kernels and host events listed per row, by time")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="every request's temperature (default greedy)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--quantization", choices=QUANTIZATIONS,
                    help="model.quantization (default: the config's)")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="scheduler.decode_steps (default: the config's)")
    ap.add_argument("--decode-programs", choices=("on", "off"), default=None,
                    help="runner.decode_programs (default: the config's; null = where the "
                         "Pallas attention serves)")
    ap.add_argument("--prefill", action="store_true",
                    help="profile prefill steps of B prompts of --context tokens instead")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    over = {"scheduler__max_num_seqs": max(args.batch),
            **bucket_overrides(args.token_buckets, args.seq_buckets)}
    if args.kv_cache_memory:
        over["cache__kv_cache_memory"] = args.kv_cache_memory * 2**30
    if args.quantization:
        over["model__quantization"] = args.quantization
    if args.decode_steps:
        over["scheduler__decode_steps"] = args.decode_steps
    if args.decode_programs:
        over["runner__decode_programs"] = args.decode_programs == "on"
    config = load_config(args.config).replace(**over)
    loaded = load_model(config, progress=False)
    engine = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
    engine.warm_up(progress=False)
    on_gpu = jax.devices()[0].platform == "gpu"
    # the decode rows' floors; prefill steps are set against FLOP/s instead
    gib = probe_gib(4.0)  # beside the engine's KV pages
    bandwidth = max(copy_bandwidth(gib), read_bandwidth(gib)) \
        if on_gpu and not args.prefill else None
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch:
        if args.prefill:
            rows.append(profile_prefill(engine, b, args.context, rng, args.top))
        else:
            rows.append(profile(engine, b, args.context, args.steps, rng, bandwidth, args.top,
                                sampling))
        print(json.dumps(rows[-1], indent=1), flush=True)
    result = {"benchmark": "trace-step",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "config": args.config,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "sampling": sampling,
              "quantization": config.model.quantization,
              "decode_programs": engine.runner.batch.decode_programs,
              "decode_steps": config.scheduler.decode_steps,
              "bandwidth_tb_per_s": round(bandwidth / 1e12, 3) if bandwidth else None,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
