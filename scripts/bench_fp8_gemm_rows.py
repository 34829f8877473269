"""fp8 weights at prefill sizes: weight-only against fp8 activations too, by row count.

    python scripts/bench_fp8_gemm_rows.py --rows 32 128 512 2048 8192 --out X.json

A Llama-3-8B decoder layer's four matmuls (q/k/v joined 4096 -> 6144, o 4096 -> 4096,
gate/up joined 4096 -> 28672, down 14336 -> 4096), --layers layers with weights of their
own, stored outputs-first [N, K] (runner.transposed_weights), for M rows of activations:
  bf16       bf16 weights, y = x . W^T
  fp8-w      fp8 e4m3 weights with a scale per output channel, converted to bf16 inside the
             GEMM (models/quant.py's qeinsum today)
  fp8-wa     the same weights times activations quantized to fp8 e4m3 per row (a scale
             per token, its max over 448), an fp8 x fp8 GEMM on tensor cores, the two
             scales applied to its bf16 result; the quantization is inside the timing
Each variant: median of --reps calls; TFLOP/s, and the error of its output against the
bf16 variant's (max |y - ref| / max |ref| over a matmul's outputs, the largest over the
matmuls); all variants round the same float32 weights.
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

from jaxserve.models.quant import quantize

SHAPES = dict(qkv=(4096, 6144), o=(4096, 4096), gate_up=(4096, 28672), down=(14336, 4096))


def matmul(variant: str, x, w, s):
    dims = (((1,), (1,)), ((), ()))
    if variant == "bf16":
        return jax.lax.dot_general(x, w, dims)
    if variant == "fp8-w":
        y = jax.lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=jnp.float32)
        return (y * s[None, :]).astype(x.dtype)
    xq, sx = quantize(x, (1,), "fp8")  # a scale per row, as models/quant.py's qeinsum
    y = jax.lax.dot_general(xq, w, dims, preferred_element_type=jnp.bfloat16)
    return (y.astype(jnp.float32) * sx[:, None] * s[None, :]).astype(x.dtype)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def layers_fn(variant: str):
    def run(x, ws):
        outs = []
        for layer in ws:
            for name in SHAPES:
                k = SHAPES[name][0]
                outs.append(matmul(variant, x[:, :k], *layer[name]))
        return outs
    return jax.jit(run)


def make_weights(layers: int, variant: str, seed: int = 0):
    key = jax.random.PRNGKey(seed)
    out = []
    for _ in range(layers):
        layer = {}
        for name, (k, n) in SHAPES.items():
            key, sub = jax.random.split(key)
            w = (jax.random.normal(sub, (n, k), jnp.float32) * 0.02)
            if variant == "bf16":
                layer[name] = (w.astype(jnp.bfloat16), None)
            else:
                layer[name] = quantize(w, (1,), "fp8")  # a scale per output channel
        out.append(layer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 128, 512, 2048, 8192])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    variants = ["bf16", "fp8-w", "fp8-wa"]
    weights = {v: make_weights(args.layers, v) for v in variants}
    flops_row = 2 * sum(k * n for k, n in SHAPES.values()) * args.layers
    rows_out = []
    for m in args.rows:
        x = (jax.random.normal(jax.random.PRNGKey(m), (m, 14336), jnp.float32)).astype(jnp.bfloat16)
        ref = None
        for v in variants:
            fn = layers_fn(v)
            ys = fn(x, weights[v])
            if v == "bf16":
                ref = ys
            err = max(rel_err(a, b) for a, b in zip(ys, ref, strict=True))
            t = median_seconds(fn, x, weights[v], reps=args.reps)
            row = dict(rows=m, variant=v, ms=t * 1e3, tflops=flops_row * m / t / 1e12,
                       rel_err_vs_bf16=err)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), device=str(jax.devices()[0].device_kind),
        jax=jax.__version__, layers=args.layers, shapes=SHAPES, rows=rows_out), indent=1))


if __name__ == "__main__":
    main()
