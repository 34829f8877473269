"""Offline throughput/latency benchmark of the engine.

    python scripts/bench_offline.py --config configs/smollm2-135m-cpu.yaml \
        --num-requests 32 --input-len 128 --output-len 64

N requests with random prompt ids of --input-len tokens each generate exactly --output-len
tokens (ignore_eos). Prints a summary and writes JSON (default bench/results/).

Before the timed run the same workload runs --warm-runs times untimed, with other random
prompts of the same lengths (so the prefix cache does not serve the timed ones): every
program the timed run uses has run before, as bench_cpu_peer.py times transformers'
`generate` after a first call. Warm-up runs the programs of decode steps on padding, but
on a CPU not those of prefill chunks (a long chunk's program takes seconds), whose first
run takes longer.

`floor` in the JSON: the bytes of weights a decode step reads over the device's read
bandwidth, measured (a jitted sum over 1 GiB, 4 GiB on a GPU) just before and just after
the timed run; the higher of the two sets the floor, and `step_p50_over_floor` compares
the median step with it (with few requests nearly every step is a decode step).

`by_step_kind` splits the timed run's wall time between the steps that carried prompt
tokens (prefill, alone or with decodes riding along) and those of one token per sequence
(decode). The engine dispatches a step and then reads back the one before it, so the call
after a step's dispatch is the one that waits for it: each call's time is counted to the
step the call before it dispatched (the first call's, which waits for nothing, to
`first_call_s`).

Once warm, the engine's start-up objects are frozen out of the garbage collector's way, as
the server and the offline LLM do (engine/heap.py); `gc` in the JSON counts the
collector's runs during the timed run by generation, with their summed and longest pause.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from engine_runs import digest, step_weight_bytes
from timing import GcPauses, probe_gib, read_bandwidth

from jaxserve.config import QUANTIZATIONS, load_config
from jaxserve.engine.engine import Engine, StepTimes
from jaxserve.engine.heap import freeze_startup
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs, np.float64) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def by_step_kind(kinds: list[tuple[int, int]], call_seconds: list[float]) -> dict:
    """Wall time by the kind of step it waited for. kinds[i] = (tokens, sequences) that call
    i scheduled; call_seconds[i] its wall time, which mostly waits for step i - 1."""
    out = {"first_call_s": call_seconds[0] if call_seconds else 0.0}
    for name in ("prefill", "decode"):
        out[name] = {"steps": 0, "seconds": 0.0, "tokens": 0}
    for (tokens, seqs), seconds in zip(kinds, call_seconds[1:], strict=False):
        if not seqs:
            continue
        row = out["prefill" if tokens > seqs else "decode"]
        row["steps"] += 1
        row["seconds"] += seconds
        row["tokens"] += tokens
    for name in ("prefill", "decode"):
        row = out[name]
        row["ms_per_step"] = row["seconds"] / row["steps"] * 1e3 if row["steps"] else None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="override scheduler.decode_steps (multi-step decode)")
    ap.add_argument("--attention-backend", default=None,
                    help="runner.attention_backend (default: the config's)")
    ap.add_argument("--paged-prefill", choices=("on", "off"), default=None,
                    help="runner.paged_prefill (default: the config's)")
    ap.add_argument("--dispatch-thread", choices=("on", "off"), default=None,
                    help="runner.dispatch_thread (default: the config's; null = on a GPU)")
    ap.add_argument("--decode-programs", choices=("on", "off"), default=None,
                    help="runner.decode_programs (default: the config's; null = where the "
                         "Pallas attention serves)")
    ap.add_argument("--warm-runs", type=int, default=1,
                    help="untimed runs of the workload first, with other prompts")
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                    help="model.quantization over the config's (int8, fp8, q8_0 weights)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args(argv)

    config = load_config(args.config)
    if args.decode_steps is not None:
        config = config.replace(scheduler__decode_steps=args.decode_steps)
    if args.attention_backend is not None:
        config = config.replace(runner__attention_backend=args.attention_backend)
    if args.quantization is not None:
        config = config.replace(model__quantization=args.quantization)
    if args.paged_prefill is not None:
        config = config.replace(runner__paged_prefill=args.paged_prefill == "on")
    if args.dispatch_thread is not None:
        config = config.replace(runner__dispatch_thread=args.dispatch_thread == "on")
    if args.decode_programs is not None:
        config = config.replace(runner__decode_programs=args.decode_programs == "on")
    t0 = time.perf_counter()
    loaded = load_model(config)
    load_s = time.perf_counter() - t0
    engine = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
    t0 = time.perf_counter()
    engine.warm_up()
    compile_s = time.perf_counter() - t0
    freeze_startup()  # as the server and the offline LLM do once the engine is warm
    compiles_at_warmup = engine.runner.num_compilations

    rng = np.random.default_rng(args.seed)
    vocab = loaded.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    # One short request first, so first-execution costs stay out of the figures.
    engine.add_request(rng.integers(3, vocab, 8).tolist(), SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    for w in range(args.warm_runs):
        warm_rng = np.random.default_rng([args.seed, w + 1])
        for i in range(args.num_requests):
            engine.add_request(warm_rng.integers(3, vocab, args.input_len).tolist(), params,
                               f"warm{w}-{i}")
        while engine.has_unfinished():
            engine.step()

    gib = probe_gib(1.0 if jax.default_backend() == "cpu" else 4.0)
    before_probe = engine.runner.num_compilations
    bandwidths = [read_bandwidth(gib)]
    probe_compiles = engine.runner.num_compilations - before_probe  # the sum's, not the engine's
    engine.step_times = StepTimes()
    kinds = []  # (tokens, sequences) each timed call scheduled
    schedule = engine.scheduler.schedule

    def recording_schedule():
        sched = schedule()
        kinds.append((sched.num_tokens, len(sched.seqs)))
        return sched

    engine.scheduler.schedule = recording_schedule
    preempted_before = engine.scheduler.num_preemptions
    start = time.perf_counter()
    for i in range(args.num_requests):
        engine.add_request(rng.integers(3, vocab, args.input_len).tolist(), params, f"b{i}")
    step_times, metrics = [], []
    tokens = collections.defaultdict(list)
    with GcPauses() as gc_pauses:
        while engine.has_unfinished():
            s = time.perf_counter()
            outs = engine.step()
            step_times.append(time.perf_counter() - s)
            metrics += [o.metrics for o in outs if o.finished]
            for o in outs:
                tokens[o.request_id] += o.token_ids
    elapsed = time.perf_counter() - start
    compiles_after = engine.runner.num_compilations - compiles_at_warmup - probe_compiles
    bandwidths.append(read_bandwidth(gib))
    weight_bytes = step_weight_bytes(engine)
    floor_ms = weight_bytes / max(bandwidths) * 1000
    steps = percentiles(step_times)
    # Greedy output tokens, in request order: runs that differ only in speed options
    # (--decode-steps, XLA flags) must give the same digest.
    ordered = [t for i in range(args.num_requests) for t in tokens[f"b{i}"]]

    n_out = sum(m.completion_tokens for m in metrics)
    n_in = sum(m.prompt_tokens for m in metrics)
    ttft = [m.first_token_time - m.arrival_time for m in metrics]
    tpot = [(m.finish_time - m.first_token_time) / max(1, m.completion_tokens - 1)
            for m in metrics]
    result = {
        "benchmark": "offline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "host": platform.node(), "jax": jax.__version__, "config": args.config,
        "model": loaded.model_config.name, "dtype": config.model.dtype,
        "quantization": config.model.quantization,
        "num_requests": args.num_requests, "warm_runs": args.warm_runs,
        "input_len": args.input_len,
        "output_len": args.output_len, "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed, "total_tok_s": (n_in + n_out) / elapsed,
        "ttft": percentiles(ttft), "tpot": percentiles(tpot),
        # one engine.step() each: with multi-step decode, a call of up to decode_steps tokens
        "decode_steps": config.scheduler.decode_steps,
        "attention_backend": config.runner.attention_backend,
        "paged_prefill": config.runner.paged_prefill,
        "dispatch_thread": engine.runner.dispatches_on_thread,
        "decode_programs": engine.runner.batch.decode_programs,
        "step_time": steps, "num_steps": len(step_times),
        "by_step_kind": by_step_kind(kinds, step_times),
        "floor": {"weight_bytes": weight_bytes,
                  "read_gb_s_before_after": [round(b / 1e9, 2) for b in bandwidths],
                  "read_probe_gib": round(gib, 3),
                  "floor_ms": floor_ms,
                  "step_p50_over_floor": steps["p50_ms"] / floor_ms},
        # host = the Python work of a step; wait = blocked on the device (engine.StepTimes)
        "step_phases_ms": engine.step_times.per_step_ms(),
        # the garbage collector's runs during the timed run (start-up's objects frozen)
        "gc": gc_pauses.summary(),
        "load_s": load_s, "compile_s": compile_s, "compilations_at_warmup": compiles_at_warmup,
        "compilations_after_warmup": compiles_after,
        "preemptions": engine.scheduler.num_preemptions - preempted_before,
        "kv_pages": engine.runner.num_pages, "page_size": config.cache.page_size,
        # free memory, the largest program's XLA scratch and the pages beside it, where the
        # devices report their memory (engine/kv_memory.py)
        "kv_sizing": engine.runner.kv_sizing,
        "tokens_digest": digest(ordered),
    }
    out = Path(args.out) if args.out else Path("bench/results") / (
        f"offline-{result['backend']}-{config.model.name}-"
        f"{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("device", "decode_steps", "output_tok_s",
                                             "total_tok_s", "ttft", "tpot", "step_time",
                                             "num_steps", "by_step_kind", "floor", "tokens_digest",
                                             "compile_s", "compilations_after_warmup")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
