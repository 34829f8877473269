"""The on-device sampler alone, by part, at several batch sizes (one jitted call each).

    python scripts/bench_sampling.py --vocab 128256 --rows 1 32 128 --out sampling.json

Rows of random f32 logits go through:
  top_logprobs_lax    jax.lax.top_k(logprobs, N): the top-N logprobs, the whole row sorted
  top_logprobs        sampling.top_k: the same values and ids from the N blocks that hold them
  sample_greedy       sampling.sample, every row greedy, N top logprobs
  sample_random       sampling.sample, every row with temperature 0.8, top-k 50, top-p 0.9,
                      N top logprobs
  sample_greedy_plain sampling.sample, every row greedy, no logprobs asked for
Each figure is the median of 50 calls, each waited for.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from jaxserve.engine.sampling import SamplingInputs, sample, top_k


def median_ms(fn, *args) -> float:
    return median_seconds(fn, *args, reps=50) * 1e3


def inputs(rows: int, temperature: float, num_logprobs: int) -> SamplingInputs:
    full = lambda value, dtype: jnp.full((rows,), value, dtype)
    return SamplingInputs(
        temperature=full(temperature, jnp.float32), top_k=full(50, jnp.int32),
        top_p=full(0.9, jnp.float32), min_p=full(0.0, jnp.float32),
        repetition_penalty=full(1.0, jnp.float32), presence_penalty=full(0.0, jnp.float32),
        frequency_penalty=full(0.0, jnp.float32), seeds=full(7, jnp.uint32),
        output_index=full(3, jnp.int32), num_logprobs=full(num_logprobs, jnp.int32),
        banned=jnp.full((rows, 1), -1, jnp.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--num-top", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    n = args.num_top
    results = []
    for rows in args.rows:
        logits = jax.random.normal(jax.random.key(rows), (rows, args.vocab), jnp.float32) * 4
        mask = jnp.zeros((rows, args.vocab), jnp.bool_)
        counts = jnp.zeros((rows, args.vocab), jnp.int32)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        lax_top = jax.lax.top_k(logprobs, n)
        ours = jax.jit(top_k, static_argnums=1)(logprobs, n)
        assert all(np.array_equal(a, b) for a, b in zip(lax_top, ours, strict=True))
        sampler = jax.jit(sample, static_argnums=4)
        row = {"rows": rows,
               "top_logprobs_lax_ms": median_ms(jax.jit(jax.lax.top_k, static_argnums=1),
                                                logprobs, n),
               "top_logprobs_ms": median_ms(jax.jit(top_k, static_argnums=1), logprobs, n),
               "sample_greedy_ms": median_ms(sampler, logits, mask, counts,
                                             inputs(rows, 0.0, n), n),
               "sample_random_ms": median_ms(sampler, logits, mask, counts,
                                             inputs(rows, 0.8, n), n),
               "sample_greedy_plain_ms": median_ms(sampler, logits, mask, counts,
                                                   inputs(rows, 0.0, -1), n)}
        results.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(results[-1]), flush=True)
    out = {"benchmark": "sampling",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "device": jax.devices()[0].device_kind, "vocab": args.vocab, "num_top": n,
           "rows": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
