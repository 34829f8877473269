"""q8_0 weights on a GPU: the Pallas kernel against XLA's matmuls, on the 8B layer's shapes.

    python scripts/bench_q8_0_matmul.py --rows 1 32 --out X.json            # the kernel's tiling
    python scripts/bench_q8_0_matmul.py --rows 1 32 --grid --out X.json     # every tiling

A Llama-3-8B decoder layer's four matmuls, stored inputs-first [K, N] (q/k/v joined
4096 -> 6144, o 4096 -> 4096, gate/up joined 4096 -> 28672, down 14336 -> 4096), each with
--layers weights of its own in one jitted call (one at a time, behind an optimization
barrier, as models/quant.py's qeinsum runs them), for M rows of bfloat16 activations:
  bf16          bf16 weights
  int8_channel  int8 weights with a scale per output channel, converted inside XLA's GEMM
  q8_0_dequant  q8_0 (int8, a scale per block of 32 inputs): the weight dequantized by XLA,
                then its GEMM (qeinsum's path for q8_0 off the kernel)
  q8_0_kernel   q8_0 through pallas_kernels/q8_0_matmul.py: with the tiling that qeinsum
                uses, and (with --grid) every block_n x splits x block_k x num_warps
Median µs per matmul over --reps calls, and the weight bytes read per second (q8_0: 1 byte
per weight plus a float32 scale per 32). The kernel's output is checked against the
dequantized product first.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from jaxserve.models.quant import dequantize
from pallas_kernels.q8_0_matmul import BLOCK, q8_0_matmul, tiling

SHAPES = dict(qkv=(4096, 6144), o=(4096, 4096), gate_up=(4096, 28672), down=(14336, 4096))


def each_layer(fn):
    """One jitted call of fn(x, w, s) over every layer's weight, one layer at a time."""
    def run(x, ws, ss):
        return [fn(x, *jax.lax.optimization_barrier((w, s))) for w, s in zip(ws, ss, strict=True)]
    return jax.jit(run)


BASELINES = {
    "bf16": lambda x, w, s: x @ w,
    "int8_channel": lambda x, q, s: ((x @ q.astype(x.dtype)).astype(jnp.float32)
                                     * s).astype(x.dtype),
    "q8_0_dequant": lambda x, q, s: x @ dequantize(q, s).astype(x.dtype),
}


def grid(k: int, n: int):
    for block_n, splits, block_k, warps in itertools.product(
            (64, 128, 256), (1, 2, 4, 8, 16), (32, 64, 128), (4, 8)):
        programs = n // block_n * splits
        if n % block_n == 0 and k % (splits * block_k) == 0 and 64 <= programs <= 2048:
            yield dict(block_n=block_n, splits=splits, block_k=block_k, num_warps=warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--grid", action="store_true", help="time every tiling, not only qeinsum's")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows_out = []
    for name, (k, n) in SHAPES.items():
        qs = [jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8))
              for _ in range(args.layers)]
        blocks = [jnp.asarray(rng.random((k // BLOCK, n), dtype=np.float32) * 0.01)
                  for _ in range(args.layers)]
        channels = [jnp.asarray(rng.random((n,), dtype=np.float32) * 0.01)
                    for _ in range(args.layers)]
        weights = {"bf16": ([q.astype(jnp.bfloat16) for q in qs], channels),
                   "int8_channel": (qs, channels), "q8_0_dequant": (qs, blocks)}
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            runs = [(v, {}, each_layer(fn), weights[v]) for v, fn in BASELINES.items()]
            tilings = [dict(tiling(k, n), num_warps=4)] + (list(grid(k, n)) if args.grid else [])
            for t in tilings:
                fn = each_layer(lambda x, q, s, t=t: q8_0_matmul(x, q, s, **t))
                runs.append(("q8_0_kernel", t, fn, (qs, blocks)))
            want = np.asarray(x, np.float32) @ np.asarray(dequantize(qs[0], blocks[0]))
            for variant, t, fn, (ws, ss) in runs:
                if variant == "q8_0_kernel":
                    got = np.asarray(fn(x, ws[:1], ss[:1])[0], np.float32)
                    err = float(np.abs(got - want).max() / np.abs(want).max())
                    assert err < 2e-2, (name, m, t, err)
                us = median_seconds(fn, x, ws, ss, reps=args.reps) * 1e6 / args.layers
                per_weight = 2 if variant == "bf16" else 1 + (4 / BLOCK if "q8_0" in variant else 0)
                row = dict(shape=name, K=k, N=n, rows=m, variant=variant, us=round(us, 1),
                           TBps=round(k * n * per_weight / us / 1e6, 2),
                           qeinsum_tiling=variant == "q8_0_kernel" and t is tilings[0], **t)
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), device=str(jax.devices()[0].device_kind),
        jax=jax.__version__, layers=args.layers, rows=rows_out), indent=1))


if __name__ == "__main__":
    main()
