"""The MoE grouped matmul on one GPU: XLA's `jax.lax.ragged_dot` against the Pallas Mosaic GPU
kernel JAX ships (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`), and against a dense
einsum over every expert (each expert's weights read once, rows of other experts wasted).

    python scripts/bench_grouped_matmul.py --out bench/results/grouped-matmul.json

Shapes are one projection of a Mixtral-8x7B MoE layer as one device holds it: G experts of
[K, N] (expert: 2 -> 4 experts of [4096, 14336]; tensor: 2 -> 8 experts of [4096, 7168]),
with M = tokens x top-k rows spread over the experts at random (sorted by expert). The floor
is the expert bytes read (G x K x N x 2) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import copy_bandwidth, median_seconds


def group_sizes(m: int, g: int, rng: np.random.Generator) -> jax.Array:
    return jnp.asarray(np.bincount(rng.integers(0, g, m), minlength=g), jnp.int32)


def dense(lhs, rhs, sizes):
    """Every row through every expert, then each row keeps its own expert's output."""
    owner = jnp.repeat(jnp.arange(rhs.shape[0]), sizes, total_repeat_length=lhs.shape[0])
    out = jnp.einsum("mk,gkn->gmn", lhs, rhs)
    return jnp.take_along_axis(out, owner[None, :, None], axis=0)[0]


def mgpu_candidates(n: int):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    for bm, bn, steps, gbn in itertools.product((64, 128), (128, 256), (4,), (1, 2)):
        if n % (bn * gbn):
            continue
        kernel = functools.partial(ragged_dot_mgpu.ragged_dot, block_m=bm, block_n=bn,
                                   block_k=64, max_concurrent_steps=steps, grid_block_n=gbn)
        yield (f"mgpu bm{bm} bn{bn} s{steps} g{gbn}",
               lambda a, b, s, kernel=kernel: kernel(a, b, group_sizes=s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    rng = np.random.default_rng(0)
    rows = []
    for name, g, k, n in (("expert2", 4, 4096, 14336), ("tensor2", 8, 4096, 7168)):
        rhs = jax.random.normal(jax.random.key(1), (g, k, n), jnp.bfloat16)
        floor = g * k * n * 2 / bandwidth
        for t in args.tokens:
            m = t * args.top_k
            lhs = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
            sizes = group_sizes(m, g, rng)
            want = np.asarray(jax.lax.ragged_dot(lhs, rhs, sizes), np.float32)
            impls = [("xla ragged_dot", jax.lax.ragged_dot), ("dense einsum", dense)]
            if m >= 64:  # the kernel's row blocks are 64+
                impls += list(mgpu_candidates(n))
            for label, fn in impls:
                f = jax.jit(fn)
                try:
                    got = np.asarray(f(lhs, rhs, sizes), np.float32)
                    err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-9))
                    sec = median_seconds(f, lhs, rhs, sizes, reps=20)
                except Exception as e:  # noqa: BLE001 -- a config the kernel refuses
                    rows.append({"shape": name, "tokens": t, "impl": label,
                                 "error": str(e).splitlines()[0][:200]})
                    continue
                rows.append({"shape": name, "experts": g, "k": k, "n": n, "tokens": t,
                             "rows": m, "impl": label, "ms": sec * 1e3, "floor_ms": floor * 1e3,
                             "floor_share": floor / sec, "max_rel_err": err})
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "grouped-matmul",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_bandwidth_bytes_s": bandwidth, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
