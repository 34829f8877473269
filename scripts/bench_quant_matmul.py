"""Quantized-weight matmuls on GPU: does any formulation read int8/fp8 weights at the speed
of bf16? A stack of L MLP layers (E x F gate/up, F x E down), decoded for T tokens, each
variant timed alone (median of 30 calls), with its achieved weight bandwidth and scratch.

    python scripts/bench_quant_matmul.py OUT_DIR          (QMM_SHAPE=L,E,F to change shapes)

Variants: bf16 (XLA); convert (weights converted inside the layer, as models/quant.py's
qeinsum did before the barrier); +barrier (qeinsum now: conversion kept per layer);
+list/+loop (layers unstacked / a while loop); mixed (dot_general on bf16 x int8);
w8a8 (fp8 activations x fp8 weights, cuBLASLt, weights stored [K, N], which XLA transposes
every call); w8a8nk (the same with weights stored [N, K], cuBLASLt's own layout, and a bf16
result); pallas / k2 (Pallas Triton GEMMs that load int8/fp8 tiles and convert them in
registers, with and without split-K).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

L, E, F = map(int, os.environ.get("QMM_SHAPE", "8,4096,14336").split(","))
bf = jnp.bfloat16


def quant(w, mode):
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0, keepdims=True)
    qmax = 127.0 if mode == "int8" else 448.0
    s = amax / qmax
    x = w.astype(jnp.float32) / s
    q = (
        jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)
        if mode == "int8"
        else x.astype(jnp.float8_e4m3fn)
    )
    return q, s[0, :]


def pallas_qmm(x, w, s, bm=16, bn=64, bk=256, warps=4, stages=3, split=1, f32=False):
    M, K = x.shape
    N = w.shape[1]
    if split > 1:
        ks = K // split
        parts = [
            pallas_qmm(
                x[:, i * ks : (i + 1) * ks],
                w[i * ks : (i + 1) * ks],
                jnp.ones_like(s),
                bm,
                bn,
                bk,
                warps,
                stages,
                1,
                f32=True,
            )
            for i in range(split)
        ]
        return (sum(parts) * s).astype(x.dtype)
    Mp = -(-M // bm) * bm
    if Mp != M:
        x = jnp.pad(x, ((0, Mp - M), (0, 0)))

    def kernel(x_ref, w_ref, s_ref, o_ref):
        def body(k, acc):
            xs = x_ref[:, pl.ds(k * bk, bk)]
            ws = w_ref[pl.ds(k * bk, bk), :].astype(xs.dtype)
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), jnp.float32))
        o_ref[...] = (acc * s_ref[...][None, :]).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        grid=(Mp // bm, N // bn),
        in_specs=[
            pl.BlockSpec((bm, K), lambda i, j: (i, 0)),
            pl.BlockSpec((K, bn), lambda i, j: (0, j)),
            pl.BlockSpec((bn,), lambda i, j: (j,)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, N), jnp.float32 if f32 else x.dtype),
        interpret=jax.default_backend() == "cpu",
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(x, w, s)
    return out[:M]


def qmm2(x, w, s, bn=128, bk=128, split=4, warps=4, stages=3, unroll=0):
    M, K = x.shape
    N = w.shape[1]
    Mp = max(16, -(-M // 16) * 16)
    if Mp != M:
        x = jnp.pad(x, ((0, Mp - M), (0, 0)))
    ks = K // split
    nk = ks // bk

    def kernel(x_ref, w_ref, o_ref):
        def body(k, acc):
            xs = x_ref[:, pl.ds(k * bk, bk)]
            ws = w_ref[pl.ds(k * bk, bk), :].astype(xs.dtype)
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        acc = jnp.zeros((Mp, bn), jnp.float32)
        if unroll:
            for k in range(nk):
                acc = body(k, acc)
        else:
            acc = jax.lax.fori_loop(0, nk, body, acc)
        o_ref[...] = acc

    out = pl.pallas_call(
        kernel,
        grid=(N // bn, split),
        in_specs=[
            pl.BlockSpec((Mp, ks), lambda j, t: (0, t)),
            pl.BlockSpec((ks, bn), lambda j, t: (t, j)),
        ],
        out_specs=pl.BlockSpec((None, Mp, bn), lambda j, t: (t, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split, Mp, N), jnp.float32),
        interpret=jax.default_backend() == "cpu",
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(x, w)
    return (out.sum(0)[:M] * s).astype(x.dtype)


def mm(variant, x, w, s):
    if variant.startswith("k2"):
        kw = dict(p.split("=") for p in variant.split(":")[1:])
        return qmm2(x, w, s, **{k: int(v) for k, v in kw.items()})
    if variant == "bf16":
        return x @ w
    if variant == "convert":
        y = jnp.einsum("te,ef->tf", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * s).astype(x.dtype)
    if variant == "mixed":
        y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (y * s).astype(x.dtype)
    if variant in ("w8a8", "w8a8nk"):  # fp8 activations, one scale per token
        xa = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True) / 448.0
        xa = jnp.where(xa > 0, xa, 1.0)
        xq = (x.astype(jnp.float32) / xa).astype(jnp.float8_e4m3fn)
        if variant == "w8a8":  # w is [K, N]
            y = jax.lax.dot_general(xq, w, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        else:  # w is [N, K]: contract K with K, a bf16 result
            y = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=bf)
        return (y.astype(jnp.float32) * xa * s).astype(x.dtype)
    if variant.startswith("pallas"):
        kw = dict(p.split("=") for p in variant.split(":")[1:])
        return pallas_qmm(x, w, s, **{k: int(v) for k, v in kw.items()})


def mlp_list(variant, x, ws):
    h = x
    for i in range(L):
        p = {k: v[i] for k, v in ws.items()}
        g = mm(variant, h, p["g"], p.get("gs"))
        u = mm(variant, h, p["u"], p.get("us"))
        h = h + mm(variant, jax.nn.silu(g) * u, p["d"], p.get("ds")) * 0.01
    return h


def mlp_barrier(variant, x, ws):
    def layer(h, p):
        p = jax.lax.optimization_barrier(p)
        g = mm(variant, h, p["g"], p.get("gs"))
        u = mm(variant, h, p["u"], p.get("us"))
        return h + mm(variant, jax.nn.silu(g) * u, p["d"], p.get("ds")) * 0.01, None

    return jax.lax.scan(layer, x, ws, unroll=True)[0]


def mlp_loop(variant, x, ws):
    def layer(h, p):
        g = mm(variant, h, p["g"], p.get("gs"))
        u = mm(variant, h, p["u"], p.get("us"))
        return h + mm(variant, jax.nn.silu(g) * u, p["d"], p.get("ds")) * 0.01, None

    return jax.lax.scan(layer, x, ws)[0]


def mlp(variant, x, ws):
    if variant.endswith("+list"):
        return mlp_list(variant[:-5], x, ws)
    if variant.endswith("+barrier"):
        return mlp_barrier(variant[:-8], x, ws)
    if variant.endswith("+loop"):
        return mlp_loop(variant[:-5], x, ws)
    return mlp_scan(variant, x, ws)


def mlp_scan(variant, x, ws):
    def layer(h, p):
        g = mm(variant, h, p["g"], p.get("gs"))
        u = mm(variant, h, p["u"], p.get("us"))
        d = mm(variant, jax.nn.silu(g) * u, p["d"], p.get("ds"))
        return h + d * 0.01, None

    return jax.lax.scan(layer, x, ws, unroll=True)[0]


def make(mode):
    """The MLP stack's weights, [L, K, N] each; mode "fp8-nk" stores them [L, N, K]."""
    k = jax.random.split(jax.random.key(0), 3)
    g = jax.random.normal(k[0], (L, E, F), bf) * 0.02
    u = jax.random.normal(k[1], (L, E, F), bf) * 0.02
    d = jax.random.normal(k[2], (L, F, E), bf) * 0.02
    if mode == "bf16":
        return {"g": g, "u": u, "d": d}
    out = {}
    for n, w in (("g", g), ("u", u), ("d", d)):
        q, s = jax.jit(jax.vmap(functools.partial(quant, mode=mode.split("-")[0])))(w)
        out[n], out[n + "s"] = (jnp.swapaxes(q, 1, 2) if mode == "fp8-nk" else q), s
    return out


def bench(variant, ws, T):
    x = jax.random.normal(jax.random.key(1), (T, E), bf)
    f = jax.jit(functools.partial(mlp, variant))
    try:
        c = f.lower(x, ws).compile()
    except Exception as e:
        print(f"{variant:40s} T={T}: FAIL {type(e).__name__}: {str(e)[:200]}")
        return None
    txt = c.as_text()
    ma = c.memory_analysis()
    y = c(x, ws)
    y.block_until_ready()
    ts = []
    for _ in range(30):
        t = time.perf_counter()
        y = c(x, ws)
        y.block_until_ready()
        ts.append(time.perf_counter() - t)
    ms = np.median(ts) * 1e3
    nbytes = sum(a.nbytes for a in jax.tree.leaves(ws))
    print(
        f"{variant:40s} T={T}: {ms:.3f} ms  {nbytes / ms / 1e6:.0f} GB/s  "
        f"temp={ma.temp_size_in_bytes / 1e6:.0f}MB "
        f"triton={txt.count('__triton')} cublas={txt.count('cublas')}",
        flush=True,
    )
    return y


K2 = [
    "k2:bn=64:bk=128:split=4:unroll=1",
    "k2:bn=32:bk=256:split=4:unroll=1",
    "k2:bn=64:bk=256:split=8:unroll=1",
    "k2:bn=64:bk=64:split=8:unroll=1:stages=1",
    "k2:bn=128:bk=128:split=4",
    "k2:bn=128:bk=128:split=4:unroll=1",
    "k2:bn=64:bk=256:split=4:unroll=1",
    "k2:bn=128:bk=64:split=8:unroll=1",
    "k2:bn=256:bk=64:split=4:warps=8:unroll=1",
    "k2:bn=64:bk=128:split=8:unroll=1",
    "k2:bn=128:bk=256:split=2:warps=8:unroll=1",
]
XLA = ["convert", "convert+barrier", "convert+list", "convert+loop", "mixed"]
PALLAS = ["pallas:bn=64:bk=256", "pallas:bm=32:bn=64:bk=256", "pallas:bn=128:bk=128",
          "pallas:bm=32:bn=128:bk=128:warps=8"]
for mode, variants in (
    ("bf16", ["bf16", "bf16+list", "bf16+loop"]),
    ("int8", XLA + PALLAS + K2),
    ("fp8", XLA + ["w8a8"] + PALLAS + K2),
    ("fp8-nk", ["w8a8nk"]),
):
    ws = make(mode)
    for T in (32, 128):
        ref = None
        for v in variants:
            y = bench(v, ws, T)
            if y is not None:
                if ref is None:
                    ref = y
                else:
                    print(
                        "   max diff vs first",
                        float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)))),
                    )
    del ws
