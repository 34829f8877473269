"""int8 weights through JAX's own Hopper mixed-type GEMM (Mosaic GPU), against XLA.

    python scripts/bench_mixed_matmul.py --out X.json

`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu` multiplies an int8 left
operand by a bf16 right one: TMA loads into shared memory, warp-specialised pipelining,
the int8 tile converted in registers and fed to WGMMA. A decode matmul y[T, N] = x[T, K] @
W[K, N] is written the other way round for it: y^T = W^T x^T, the int8 weight stored [N, K]
(out, in) as the left operand, the T tokens (padded to 16) as the right one. Per-channel
scales multiply the result. Each variant runs on L different weights in one jitted call
(L chosen so that they far exceed the L2 cache), median of 20 calls, per matmul:

  bf16-xla   x @ W, bf16 weights (the model's matmul today)
  int8-xla   the weight converted inside the dot after an optimization barrier (what
             models/quant.py's qeinsum does), then scaled
  mg-int8-*  the Mosaic GPU kernel: tile_m 64 per warpgroup (two warpgroups over N),
             tile_k 128 or 256, 4 stages

Rows are written to --out as they finish. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed
from timing import median_seconds

SHAPES = [(14336, 4096), (4096, 14336), (6144, 4096), (1024, 4096)]  # (N out, K in), 8B


def xla_int8(x, qs, scales):
    outs = []
    for q, s in zip(qs, scales, strict=True):
        q, s = jax.lax.optimization_barrier((q, s))
        y = jnp.einsum("te,ef->tf", x, q.astype(x.dtype), preferred_element_type=jnp.float32)
        outs.append((y * s).astype(x.dtype))
    return outs


def mosaic_int8(x, qs_nk, scales, config):
    T = x.shape[0]
    Tp = config.tile_n
    xt = jnp.pad(x, ((0, Tp - T), (0, 0))).T  # [K, Tp]
    return [(mixed.mixed_matmul_kernel(q, xt, out_dtype=jnp.float32, config=config)[:, :T].T
             * s).astype(x.dtype) for q, s in zip(qs_nk, scales, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows: list[dict] = []
    key = jax.random.key(0)
    for N, K in SHAPES:
        L = int(min(64, max(4, 1.2e9 // (N * K))))
        ws = [jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.bfloat16) * 0.02
              for i in range(L)]
        amax = [jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0) for w in ws]
        scales = [a / 127 for a in amax]
        q_kn = [jnp.clip(jnp.round(w.astype(jnp.float32) / s), -127, 127).astype(jnp.int8)
                for w, s in zip(ws, scales, strict=True)]
        q_nk = [q.T for q in q_kn]
        jax.block_until_ready((q_kn, q_nk))
        for T in args.tokens:
            x = jax.random.normal(jax.random.fold_in(key, 999), (T, K), jnp.bfloat16)
            ref = x.astype(jnp.float32) @ (q_kn[0].astype(jnp.float32) * scales[0])
            Tp = max(16, -(-T // 16) * 16)
            variants = {"bf16-xla": (lambda x, ws: [x @ w for w in ws], (x, ws), 2),
                        "int8-xla": (xla_int8, (x, q_kn, scales), 1)}
            for tile_k in (128, 256):
                config = mixed.TuningConfig(
                    tile_m=64, tile_n=Tp, tile_k=tile_k, max_concurrent_steps=4,
                    epi_tile_n=min(Tp, 64), epi_tile_m=64,
                    grid_minor_dim=mixed.MatmulDimension.M, grid_tile_width=1,
                    wg_dimension=mixed.MatmulDimension.M, cluster_dimension=None)
                variants[f"mg-int8-tm64-tk{tile_k}-st4"] = (
                    lambda x, q, s, c=config: mosaic_int8(x, q, s, c), (x, q_nk, scales), 1)
            for name, (fn, fargs, itemsize) in variants.items():
                row = {"N": N, "K": K, "T": T, "variant": name, "layers": L}
                try:
                    f = jax.jit(fn)
                    t = median_seconds(f, *fargs, reps=20)
                    out = f(*fargs)[0].astype(jnp.float32)
                    row.update(us=t / L * 1e6, tbps=N * K * itemsize * L / t / 1e12)
                    if name != "bf16-xla":  # against the int8 weights in float32
                        row["max_rel_err"] = float(jnp.max(jnp.abs(out - ref))
                                                   / jnp.max(jnp.abs(ref)))
                except Exception as e:  # a tiling that does not fit shared memory, ...
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(
                    {"benchmark": "mixed-type-matmul", "device": jax.devices()[0].device_kind,
                     "jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
