"""What one call of a compiled step costs the host, apart from building its inputs.

    python scripts/probe_step_call.py --out probe.json

Issue 12's host target (1 ms a step at B=64) leaves little beside the compiled step's call,
which `scripts/bench_host.py` times inside the engine (`call_ms`). This probe times calls
alone, each the median over --calls calls in a loop, with one call in flight as in the
engine (no wait between them), in microseconds:

* fusion_numpy / fusion_device / fusion_no_input / fusion_device_put: a jitted function of
  one small fusion that donates a [1, 1, 4096] state, given a [1, 1, 16000] int32 buffer as
  numpy, already on the device, not at all, or put on the device first (`jax.device_put`);
* engine_call_numpy / engine_call_device: the engine's own compiled B=64 decode step (the
  tiny model of bench_host.py, 512-token prompts), given its packed input buffer as numpy
  or already on the device; `_with_wait_per_call`: 50 calls and a final wait, per call
  (so the device's time when it sets the pace);
* engine_chain_prev...: the same call with what the engine does around it added one thing
  at a time (engine_pattern_calls), to find where the engine's call loses its time;
* engine_thread_...: the same chained calls made on a thread while this thread runs Python,
  as with runner.dispatch_thread (thread_calls): the call's median there and how much of
  its Python rate alone this thread keeps (a call that held the GIL while it launches the
  step would take its share), at Python's default switch interval and at 0.1 ms
  (`sys.setswitchinterval`).

The engine's config is the demo's for the backend (the GPU config on a GPU), as in
bench_host.py; --decode-steps K makes the step a call of K decode steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_host import REPO, TINY
from engine_runs import decode_together
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model


def median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e6, 1)


def fusion_calls(calls: int) -> dict:
    mesh = jax.make_mesh((1, 1), ("data", "pipeline"))
    spec = NamedSharding(mesh, P("data", "pipeline"))
    state = {"s": jax.device_put(jnp.zeros((1, 1, 4096)), spec)}
    with_input = jax.jit(lambda s, b: s + b[:, :, :1].astype(jnp.float32), donate_argnums=(0,))
    no_input = jax.jit(lambda s: s + 1.0, donate_argnums=(0,))
    host = np.zeros((1, 1, 16000), np.int32)
    device = jax.device_put(host, spec)
    variants = {
        "fusion_numpy": lambda: state.update(s=with_input(state["s"], host)),
        "fusion_device": lambda: state.update(s=with_input(state["s"], device)),
        "fusion_no_input": lambda: state.update(s=no_input(state["s"])),
        "fusion_device_put": lambda: state.update(
            s=with_input(state["s"], jax.device_put(host, spec))),
    }
    out = {}
    for name, fn in variants.items():
        fn()
        fn()
        jax.block_until_ready(state["s"])
        out[name] = median_us(fn, calls)
        jax.block_until_ready(state["s"])
    return out


def engine_calls(config_path: Path, decode_steps: int, calls: int) -> dict:
    shape = Path(f"/tmp/probe-step-call-{os.getpid()}.shape.json")
    TINY.save(shape)
    config = load_config(config_path).replace(
        model__dtype="float32", checkpoint__source="random",
        checkpoint__random_shape=str(shape), runner__compilation_cache_dir=None,
        cache__max_model_len=1024, cache__kv_cache_memory=float(2**30),
        runner__token_buckets=(64, 2048), runner__seq_buckets=(64,),
        scheduler__max_num_seqs=64, scheduler__max_num_batched_tokens=2048,
        scheduler__decode_steps=decode_steps)
    loaded = load_model(config, progress=False)
    shape.unlink()
    engine = Engine(config, loaded.model_config, loaded.params, None, loaded.mesh)
    prompt = np.random.default_rng(0).integers(3, TINY.vocab_size, 512).tolist()
    decode_together(engine, [prompt] * 64, SamplingParams(
        max_tokens=400, temperature=0.0, ignore_eos=True), "r")
    for _ in range(5):
        engine.step()
    jax.block_until_ready(engine.in_flight.out)
    runner = engine.runner
    sched = engine.scheduler.schedule()
    bucket, (device_buffer,) = runner.prepare(sched, engine.page_tables, engine.in_flight)
    host_buffer = np.asarray(device_buffer)
    step = runner._executable(*bucket)
    prev = engine.in_flight.prev_tokens

    def call(buffer):
        runner.state, _, _ = step(runner.params, runner.state, buffer, prev)

    out = {"bucket": list(bucket), "buffer_bytes": host_buffer.nbytes,
           "param_leaves": len(jax.tree.leaves(runner.params)),
           "state_leaves": len(jax.tree.leaves(runner.state))}
    for name, buffer in (("engine_call_numpy", host_buffer),
                         ("engine_call_device", device_buffer)):
        call(buffer)
        call(buffer)
        jax.block_until_ready(runner.state)
        out[name] = median_us(lambda b=buffer: call(b), calls)
        jax.block_until_ready(runner.state)
        t = time.perf_counter()
        for _ in range(50):
            call(buffer)
        jax.block_until_ready(runner.state)
        out[name + "_with_wait_per_call"] = round((time.perf_counter() - t) / 50 * 1e6, 1)
    out.update(engine_pattern_calls(step, runner, host_buffer, prev, calls))
    out.update(thread_calls(step, runner, host_buffer, prev, calls))
    text = step.as_text()
    out["hlo_kernels_approx"] = text.count("fusion(") + text.count("custom-call(")
    return out


def engine_pattern_calls(step, runner, buffer: np.ndarray, prev, calls: int) -> dict:
    """The engine's step call timed alone while the loop around it adds, one at a time, what
    the engine does between calls: chain_prev passes the tokens of the call before (still in
    flight) as the engine does; + copy_async starts the outputs' copy to the host
    (`copy_to_host_async`); + fetch reads the previous call's outputs after the call;
    + python runs ~0.6 ms of Python between calls (the engine's scheduling and processing);
    + spin waits 0.6 ms in a tight loop instead (the device idles, little Python runs).
    chain_prev_kept keeps every call's outputs alive to the end of the loop, so no buffer
    still in use on the device is freed between calls (is the cost the input not ready, or
    freeing the one before?)."""
    def busy_python():
        t = time.perf_counter() + 6e-4
        junk = []
        while time.perf_counter() < t:
            junk.append({"i": len(junk), "s": str(len(junk))})

    def spin():
        t = time.perf_counter() + 6e-4
        while time.perf_counter() < t:
            pass

    variants = {"chain_prev": (False, False, None, False),
                "chain_prev_kept": (False, False, None, True),
                "chain_prev_copy_async": (True, False, None, False),
                "chain_prev_copy_async_fetch": (True, True, None, False),
                "chain_prev_copy_async_fetch_python": (True, True, busy_python, False),
                "chain_prev_copy_async_fetch_spin": (True, True, spin, False)}
    result = {}
    for name, (copy, fetch, between, keep) in variants.items():
        tokens, pending, times, kept = prev, None, [], []
        for _ in range(calls + 3):
            t = time.perf_counter()
            runner.state, o, tokens = step(runner.params, runner.state, buffer, tokens)
            times.append(time.perf_counter() - t)
            if keep:
                kept.append((o, tokens))
            if copy:
                o.copy_to_host_async()
            if fetch and pending is not None:
                np.asarray(jax.device_get(pending))
            pending = o
            if between is not None:
                between()
        jax.block_until_ready(runner.state)
        del kept
        result["engine_" + name] = round(float(np.median(times[3:])) * 1e6, 1)
    return result


def thread_calls(step, runner, buffer: np.ndarray, prev, calls: int) -> dict:
    """Chained calls on a second thread, back to back, while this thread runs Python: the
    calls' median (microseconds) and this thread's Python rate as a share of its rate
    alone."""
    def python_for(seconds: float) -> int:
        n, t = 0, time.perf_counter() + seconds
        while time.perf_counter() < t:
            _ = {"i": n, "s": str(n)}
            n += 1
        return n

    result, default = {}, sys.getswitchinterval()
    for label, interval in (("default", default), ("0.1ms", 1e-4)):
        sys.setswitchinterval(interval)
        try:
            alone = python_for(0.2) / 0.2
            times, done = [], threading.Event()

            def loop(times=times, done=done):
                tokens = prev
                for _ in range(calls + 3):
                    t = time.perf_counter()
                    runner.state, _, tokens = step(runner.params, runner.state, buffer, tokens)
                    times.append(time.perf_counter() - t)
                jax.block_until_ready(runner.state)
                done.set()

            worker = threading.Thread(target=loop)
            t0 = time.perf_counter()
            worker.start()
            n = 0
            while not done.is_set():
                n += python_for(1e-3)
            elapsed = time.perf_counter() - t0
            worker.join()
        finally:
            sys.setswitchinterval(default)
        result[f"engine_thread_call_{label}"] = round(float(np.median(times[3:])) * 1e6, 1)
        result[f"engine_thread_python_share_{label}"] = round(n / elapsed / alone, 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--decode-steps", type=int, default=1)
    ap.add_argument("--config", default=None,
                    help="base config (default: the demo's config for this backend)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base = Path(args.config) if args.config else REPO / "configs" / (
        "smollm2-135m-gpu.yaml" if jax.default_backend() == "gpu" else "smollm2-135m-cpu.yaml")
    result = {"benchmark": "step-call-host-cost",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}",
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "config": base.name,
              "decode_steps": args.decode_steps, "unit": "microseconds per call (median)",
              **fusion_calls(args.calls),
              **engine_calls(base, args.decode_steps, min(args.calls, 200))}
    print(json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
