"""Where a decode step's time goes: model alone, model without attention, sampling alone,
the whole jitted step, and the engine's step() wall time (host included).

    python scripts/profile_step.py --config configs/llama3-8b-random-gpu.yaml --batch 32
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from engine_runs import prefilling, replay_ms
from timing import median_seconds

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.engine.sampling import sample
from jaxserve.loader import load_model


def bench(fn, *args):
    return median_seconds(fn, *args, reps=30) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--scan-unroll", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    config = load_config(args.config).replace(cache__kv_cache_memory=float(8 * 2**30),
                                              runner__compilation_cache_dir=None,
                                              runner__scan_unroll=args.scan_unroll)
    loaded = load_model(config)
    engine = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
    rng = np.random.default_rng(0)
    vocab = loaded.model_config.vocab_size
    for _ in range(args.batch):
        engine.add_request(rng.integers(3, vocab, args.context).tolist(),
                           SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    while prefilling(engine):
        engine.step()
    for _ in range(3):
        engine.step()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        engine.step()
    engine_ms = (time.perf_counter() - t) / n * 1000

    # The jitted step alone, replaying one decode batch.
    runner = engine.runner
    sched = engine.scheduler.schedule()
    handle = runner.execute(sched, engine.page_tables, engine.in_flight)
    handle.fetch()
    S = len(sched.seqs)
    host_t = time.perf_counter()
    handle2 = runner.execute(sched, engine.page_tables, handle)
    handle2.call.result()  # with runner.dispatch_thread, made on its thread: count it too
    dispatch_ms = (time.perf_counter() - host_t) * 1000
    handle2.fetch()

    # Replay the compiled step on the same inputs: device time per step, no host work.
    key, host_in = runner.prepare(sched, engine.page_tables, handle)
    step_ms = replay_ms(runner, key, host_in, handle2.prev_tokens, 20)

    c = loaded.model_config
    logits = jax.random.normal(jax.random.key(0), (key[1], vocab), jnp.float32)
    samp = runner.unpack(key, host_in).sampling
    table = jnp.zeros((key[1], vocab), bool)
    counts = jnp.zeros((key[1], vocab), jnp.int32)
    sample_ms = bench(jax.jit(lambda *a: sample(*a, num_top=runner.num_top)),
                      logits, table, counts, samp)
    sample0_ms = bench(jax.jit(lambda *a: sample(*a, num_top=0)), logits, table, counts, samp)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(loaded.params))
    result = {"device": jax.devices()[0].device_kind, "batch": S, "bucket": key,
              "context": args.context, "scan_unroll": args.scan_unroll, "engine_step_ms": engine_ms,
              "jitted_step_replay_ms": step_ms,
              "host_execute_dispatch_ms": dispatch_ms,
              "dispatch_thread": runner.dispatches_on_thread, "sample_ms": sample_ms,
              "sample_no_logprobs_ms": sample0_ms, "weight_bytes": weights,
              "weights_floor_ms_at_3TBs": weights / 3.0e12 * 1000, "layers": c.num_layers}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
