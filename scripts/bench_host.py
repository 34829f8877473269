"""Host work per decode step: the Python side of `engine.step()`, by phase, against context.

    python scripts/bench_host.py --batch 64 --context 512 2048 8192 --out host.json

The host's share of a step does not depend on the model's size, so a tiny random model on
CPU shows it (the device part, reading the KV cache, is reported apart as `wait_ms`). B
requests with the same prompt (so the prefix cache prefills it once) decode together; the
engine's own phase timers (`Engine.step_times`) are read over --steps decode steps:
schedule_ms (scheduler), inputs_ms (building and dispatching the step), outputs_ms
(appending tokens, stop checks, output records), host_ms (their sum) and wait_ms.
With --decode-steps K each engine step is a call of K decode steps (multi-step decode):
the phases are per call, and host_per_token_step_ms is host_ms / K.

With --prompts N --prompt-len L it also times the first step of N fresh prompts of L tokens
each, all in one prompt step (an offline run's first call, which the device waits for):
`first_step` holds the medians over --first-step-reps rounds of that call's wall time and
of its schedule_ms (admitting the prompts, taking their pages, registering their full pages
in the prefix cache) and inputs_ms (building the step's inputs and dispatching it), each
round's prompts new, and the engine drained between rounds.

The engine's other settings (layer layout, weight layout) come from --config, by default the
demo's config for the backend (configs/smollm2-135m-cpu.yaml on CPU, smollm2-135m-gpu.yaml
on a GPU), so a GPU runs its layers unrolled, as the GPU configs serve them, not in the
CPU demo's layer loop.

On CPU the "device" is the same two cores, so a long context's attention slows the host
phases it overlaps. prepare_idle_ms therefore times building one step's inputs (and
putting them on the device) again with the device idle: `Runner.prepare`, median of 200;
build_idle_ms the building alone (`BatchBuilder.micro_batch`, the host's Python). call_ms
is the median time of the compiled step's call (its dispatch, with the input buffer's
transfer): inside the inputs phase, or with runner.dispatch_thread on the dispatch thread,
where the engine's thread does not wait for it (its wait phase then holds what it still
had to wait for). step_wall_ms is the wall-clock time per step, the pace the host allows
while the tiny model's device work is smaller. The JSON records XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from engine_runs import abort_all, decode_together

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine, StepTimes
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model
from jaxserve.models.model_config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, name="tiny")


def default_base() -> Path:
    """The demo's config for this backend."""
    return REPO / "configs" / (
        "smollm2-135m-gpu.yaml" if jax.default_backend() == "gpu" else "smollm2-135m-cpu.yaml")


def tiny_config(base, shape: Path, batch: int, max_model_len: int):
    """`base` with TINY's random weights (its shape saved at `shape`), float32, and a
    scheduler that takes `batch` sequences at once in prefill chunks of up to 2048 tokens."""
    return load_config(base).replace(
        model__dtype="float32", checkpoint__source="random",
        checkpoint__random_shape=str(shape), runner__compilation_cache_dir=None,
        cache__max_model_len=max_model_len, cache__kv_cache_memory=float(2**30),
        runner__token_buckets=(batch, 2048), runner__seq_buckets=(batch,),
        scheduler__max_num_seqs=batch, scheduler__max_num_batched_tokens=2048)


def host_cpu() -> str:
    """The host's CPU model, core count and Python: the host phases vary several-fold between
    machines of one GPU kind (docs/performance.md, "Host work per step on three H100
    hosts")."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    field = lambda name: next((line.split(":", 1)[1].strip() for line in lines
                               if line.startswith(name)), None)
    model = field("model name") or platform.processor() or "unknown CPU"
    mhz, cache = field("cpu MHz"), field("cache size")
    return ", ".join([model, *([f"{float(mhz):.0f} MHz"] if mhz else []),
                      *([f"cache {cache}"] if cache else []), f"{os.cpu_count()} cores",
                      f"Python {platform.python_version()}"])


def measure(engine: Engine, batch: int, context: int, steps: int, seed: int) -> dict:
    k = engine.config.scheduler.decode_steps
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, TINY.vocab_size, context).tolist()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), "warm")
    while engine.has_unfinished():
        engine.step()
    params = SamplingParams(max_tokens=(steps + 16) * k, temperature=0.0, ignore_eos=True)
    decode_together(engine, [prompt] * batch, params, "r")
    runner, calls = engine.runner, []
    run = runner._run

    def timed_run(*args):
        t = time.perf_counter()
        out = run(*args)
        calls.append(time.perf_counter() - t)
        return out

    runner._run = timed_run  # the compiled call, timed where it is made
    try:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t
    finally:
        del runner._run
    assert len(engine.scheduler.running) == batch
    phases = engine.step_times.per_step_ms()
    row = {"batch": batch, "context": context, "steps": steps, "decode_steps": k,
           **{name: round(v, 4) for name, v in phases.items()},
           "host_per_token_step_ms": round(phases["host_ms"] / k, 4),
           "step_wall_ms": round(wall / steps * 1e3, 4),
           "call_ms": round(float(np.median(calls)) * 1e3, 4)}
    jax.block_until_ready(engine.in_flight.out)
    sched = engine.scheduler.schedule()
    prev_rows = engine.in_flight.rows
    for name, work in (
            ("build_idle_ms", lambda: runner.batch.micro_batch(sched, engine.page_tables,
                                                               prev_rows)),
            ("prepare_idle_ms", lambda: jax.block_until_ready(runner.prepare(
                sched, engine.page_tables, engine.in_flight)[1]))):
        times = []
        for _ in range(200):
            t = time.perf_counter()
            work()
            times.append(time.perf_counter() - t)
        row[name] = round(float(np.median(times)) * 1e3, 4)
    abort_all(engine)
    return row


def measure_first_step(base, shape: Path, prompts: int, prompt_len: int, reps: int,
                       dispatch_thread) -> dict:
    """The first call of `prompts` fresh prompts of `prompt_len` tokens, in one step."""
    tokens = prompts * prompt_len
    config = tiny_config(base, shape, prompts, prompt_len + 8).replace(
        runner__token_buckets=(prompts, tokens), scheduler__max_num_batched_tokens=tokens,
        runner__dispatch_thread=dispatch_thread)
    loaded = load_model(config, progress=False)
    engine = Engine(config, loaded.model_config, loaded.params, None, loaded.mesh)
    engine.warm_up(progress=False)
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    walls, schedule, inputs = [], [], []
    for r in range(reps + 1):  # the first round unrecorded: first runs of the programs
        for i in range(prompts):
            engine.add_request(rng.integers(3, TINY.vocab_size, prompt_len).tolist(), params,
                               f"p{r}-{i}")
        engine.step_times = StepTimes()
        t = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t
        phases = engine.step_times.per_step_ms()
        if r:
            walls.append(wall * 1e3)
            schedule.append(phases["schedule_ms"])
            inputs.append(phases["inputs_ms"])
        while engine.has_unfinished():
            engine.step()
    engine.close()
    med = lambda xs: round(float(np.median(xs)), 4)
    return {"prompts": prompts, "prompt_len": prompt_len, "rounds": reps,
            "wall_ms": med(walls), "schedule_ms": med(schedule), "inputs_ms": med(inputs),
            "wall_ms_all": [round(w, 4) for w in walls]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--attention-backend", default="auto",
                    choices=["auto", "reference", "pallas"],
                    help="runner.attention_backend (auto: Pallas on GPU, reference on CPU)")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="scheduler.decode_steps: decode steps per call (multi-step decode)")
    ap.add_argument("--dispatch-thread", choices=["auto", "on", "off"], default="auto",
                    help="runner.dispatch_thread (auto: on a GPU)")
    ap.add_argument("--config", default=None,
                    help="base config (default: the demo's config for this backend)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in seconds (Python's default: 0.005): how "
                         "long a thread waits for the GIL before it asks for it")
    ap.add_argument("--prompts", type=int, default=0,
                    help="also time the first step of this many fresh prompts (0: not)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--first-step-reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    base = args.config or default_base()
    shape = Path(args.out).with_suffix(".shape.json")
    TINY.save(shape)
    b_max, c_max = max(args.batch), max(args.context)
    config = tiny_config(base, shape, b_max,
                         c_max + (args.steps + 32) * args.decode_steps).replace(
        runner__attention_backend=args.attention_backend,
        scheduler__decode_steps=args.decode_steps,
        runner__dispatch_thread={"auto": None, "on": True, "off": False}[args.dispatch_thread])
    loaded = load_model(config, progress=False)
    engine = Engine(config, loaded.model_config, loaded.params, None, loaded.mesh)
    rows = []
    for b in args.batch:
        for c in args.context:
            rows.append(measure(engine, b, c, args.steps, seed=len(rows)))
            print(json.dumps(rows[-1]), flush=True)
    first = None
    if args.prompts:
        first = measure_first_step(base, shape, args.prompts, args.prompt_len,
                                   args.first_step_reps, config.runner.dispatch_thread)
        print(json.dumps(first), flush=True)
    shape.unlink()
    result = {"benchmark": "host-work-per-step",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {len(jax.devices())} JAX device(s), "
                         f"{jax.devices()[0].device_kind}",
              "host_cpu": host_cpu(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "config": Path(base).name,
              "attention_backend": args.attention_backend, "backend": jax.default_backend(),
              "dispatch_thread": engine.runner.dispatches_on_thread,
              "switch_interval_s": sys.getswitchinterval(),
              "model": dataclasses.asdict(TINY), "rows": rows, "first_step": first}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
