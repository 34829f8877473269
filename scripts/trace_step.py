"""Per-op profile of engine decode steps (jax.profiler), summed by op and by op class.

    python scripts/trace_step.py --config configs/smollm2-135m-cpu.yaml --batch 1 16 \
        --out trace.json

B requests of --context random prompt tokens are prefilled; then --steps decode steps run
under `jax.profiler.trace`. The trace's complete events are summed per name and divided by
the steps. XLA's executors name each event after its HLO op (`dot.50`,
`dynamic-slice_bitcast_fusion.2`, ...), so the classes below are taken from those names:
  weight copies   dynamic-slice / slice / copy fusions (on CPU: layer weights copied out of
                  the stacked arrays before their matmuls)
  matmuls         dot, and the oneDNN/YNNPACK fusions that hold a dot
  loop            while / conditional bodies' own bookkeeping
  other ops       every other XLA op event
  host            the engine's step() wall time, less the time blocked on the device
Runs wherever JAX runs; the figures in docs/performance.md are from CPU.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import re
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from engine_runs import abort_all, decode_together

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model

# XLA op events: an HLO instruction name (letters, '-', '_', '.', digits), no '$' (Python
# frames) and no '::' (runtime internals).
OP = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")
CLASSES = (("weight copies", re.compile(r"^(dynamic-slice|slice|copy)")),
           ("matmuls", re.compile(r"^(dot|ynn_fusion|onednn|custom-call)")),
           ("loop", re.compile(r"^(while|conditional|call)")),
           ("other ops", re.compile(r".")))


def op_class(name: str) -> str:
    return next(label for label, pattern in CLASSES if pattern.match(name))


def trace_steps(engine: Engine, steps: int) -> dict[str, float]:
    """Microseconds per step of every complete event, by name, over `steps` steps."""
    directory = tempfile.mkdtemp(prefix="trace-")
    try:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                engine.step()
        path = sorted(glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True))[-1]
        with gzip.open(path) as f:
            data = json.load(f)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += e.get("dur", 0) / steps
    return dict(total)


def profile(engine: Engine, batch: int, context: int, steps: int, rng) -> dict:
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    prompts = [rng.integers(3, vocab, context).tolist() for _ in range(batch)]
    decode_together(engine, prompts, params, f"b{batch}-")
    events = trace_steps(engine, steps)
    times = engine.step_times.per_step_ms()
    ops = {n: us for n, us in events.items() if OP.match(n)}
    classes: collections.Counter[str] = collections.Counter()
    for name, us in ops.items():
        classes[op_class(name)] += us / 1e3
    step_ms = times["host_ms"] + times["wait_ms"]
    abort_all(engine)
    return {"batch": batch, "context": context, "steps": steps,
            "step_ms": round(step_ms, 3),
            "classes_ms": {k: round(v, 3) for k, v in classes.most_common()},
            "host_ms": round(times["host_ms"], 3),
            "top_ops_ms": {n: round(us / 1e3, 3) for n, us in
                           sorted(ops.items(), key=lambda kv: -kv[1])[:15]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = load_config(args.config)
    loaded = load_model(config, progress=False)
    engine = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
    engine.warm_up(progress=False)
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch:
        rows.append(profile(engine, b, args.context, args.steps, rng))
        print(json.dumps(rows[-1], indent=1), flush=True)
    result = {"benchmark": "trace-step",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "config": args.config, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
