"""RoPE on a step's q and k, and the new K/V rows written into the paged cache: one launch.

Inputs (one layer):
  qkv:          [num_tokens, num_heads + 2 * num_kv_heads, head_dim], the joined q/k/v
                projection's output (models/llama.py, fuse_qkv): q heads, then k, then v;
  positions:    [num_tokens] int32, each token's position (>= 0);
  inv_freq:     [head_dim // 2] float32 rotary inverse frequencies (models/rope.py);
  k_pages, v_pages: [num_layers, num_pages, page_size, num_kv_heads, head_dim], updated in
                place (the outputs alias them);
  slot_mapping: [num_tokens] int32, page * page_size + offset of each token (padding tokens
                point into the null page, page 0, which no sequence reads);
  k_scales, v_scales: [num_layers, num_pages, page_size, num_kv_heads] float32, only for
                int8 or float8_e4m3fn pages (cache.kv_dtype), updated in place too.
Output: q rotated, [num_tokens, num_heads, head_dim], and the pages with layer `layer`'s
slots holding each token's rotated k and its v (quantized pages: each (token, KV head)
vector rounded to qkv's dtype, then stored as models/quant.quantize_vectors stores it, its
scale beside it). With `new_k` (unquantized pages), also the rotated k rows
[num_tokens, num_kv_heads, head_dim]: what an attention that takes this step's K/V rows
(pallas_kernels/flash_prefill.py, fresh prompts) reads as k_new, so that a prefill step
needs neither XLA's RoPE fusions nor its two scatters (22 us each a layer for 2048 tokens of
the 8B shape on an H100, where copy bandwidth moves each one's 4 MB in and out in 3 us).

XLA runs this as three kernels a layer: RoPE on q and k, and one scatter for K and one for
V (3 us each for one token, 6-7 us each for 128 on an H200, the 8B shape). Here one program
per token reads its row of qkv once, rotates q and k in float32 (HF's rotate-half
convention, as models/rope.py) and stores q, k and v. Pallas Triton; `interpret=True` runs
it on CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The largest stored magnitude of quantized pages (models/quant.py's QMAX; a test holds the
# two to the same bytes).
_QMAX = {jnp.dtype(jnp.int8): 127.0,
         jnp.dtype(jnp.float8_e4m3fn): float(jnp.finfo(jnp.float8_e4m3fn).max)}


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _round_half_even(x):
    """jnp.round for float32 |x| < 2^22, from floor (Pallas Triton has no round)."""
    r = jnp.floor(x)
    d = x - r  # exact
    odd = (r - 2.0 * jnp.floor(r * 0.5)) == 1.0
    return r + jnp.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


def _quantized(x1, x2, dtype, qmax: float):
    """quantize_vectors on rows [R, D] given as halves x1, x2 [R, D / 2] float32:
    (q1, q2 in the storage dtype, scale [R] float32)."""
    amax = jnp.maximum(jnp.max(jnp.abs(x1), axis=1), jnp.max(jnp.abs(x2), axis=1))
    scale = amax / qmax
    # (a denormal quotient is flushed to zero; a NaN stays, as quantize_vectors keeps it)
    scale = jnp.where(scale == 0, 1.0, scale)
    out = []
    for x in (x1 / scale[:, None], x2 / scale[:, None]):
        x = _round_half_even(x) if dtype == jnp.int8 else x
        out.append(jnp.clip(x, -qmax, qmax).astype(dtype))
    return (*out, scale)


def _kernel(layer_ref, pos_ref, slots_ref, inv_freq_ref, qkv_ref, *refs, num_heads: int,
            num_kv_heads: int, qmax: float | None, new_k: bool):
    # refs: k, v pages [, k, v scales] in (the same buffers as the outputs), then the outputs
    # q, k, v pages [, k, v scales] [, k rows]
    q_out, k_out, v_out, *scale_outs = refs[2 if qmax is None else 4:]
    k_rows = scale_outs.pop() if new_k else None
    t = pl.program_id(0)
    half = inv_freq_ref.shape[0]
    lo = lax.iota(jnp.int32, _next_pow2(half))[None, :]  # Triton tiles are powers of two
    hi = lo + half
    in_half = lo < half
    angle = pos_ref[t].astype(jnp.float32) * plgpu.load(inv_freq_ref.at[lo], mask=in_half,
                                                        other=0.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)  # [1, half]
    page_size = k_out.shape[2]
    slot = slots_ref[t]
    page, offset = lax.div(slot, jnp.int32(page_size)), lax.rem(slot, jnp.int32(page_size))
    layer = layer_ref[0]

    def heads(first, count):
        h = lax.iota(jnp.int32, _next_pow2(count))[:, None]
        return h, first + h, (h < count) & in_half

    def rotated(rows, mask):
        x1 = plgpu.load(qkv_ref.at[t, rows, lo], mask=mask, other=0).astype(jnp.float32)
        x2 = plgpu.load(qkv_ref.at[t, rows, hi], mask=mask, other=0).astype(jnp.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    h, rows, mask = heads(0, num_heads)
    r1, r2 = rotated(rows, mask)
    plgpu.store(q_out.at[t, h, lo], r1.astype(q_out.dtype), mask=mask)
    plgpu.store(q_out.at[t, h, hi], r2.astype(q_out.dtype), mask=mask)

    def write(pages_ref, scales_ref, h, mask, x1, x2):
        if qmax is not None:  # the rows as the model's dtype holds them, then quantized
            x1, x2 = (x.astype(qkv_ref.dtype).astype(jnp.float32) for x in (x1, x2))
            x1, x2, scale = _quantized(x1, x2, pages_ref.dtype, qmax)
            plgpu.store(scales_ref.at[layer, page, offset, h[:, 0]], scale,
                        mask=h[:, 0] < num_kv_heads)
        at = (layer, page, offset, h)
        plgpu.store(pages_ref.at[(*at, lo)], x1.astype(pages_ref.dtype), mask=mask)
        plgpu.store(pages_ref.at[(*at, hi)], x2.astype(pages_ref.dtype), mask=mask)

    k_scales, v_scales = scale_outs if scale_outs else (None, None)
    h, rows, mask = heads(num_heads, num_kv_heads)
    k1, k2 = rotated(rows, mask)
    if k_rows is not None:
        plgpu.store(k_rows.at[t, h, lo], k1.astype(k_rows.dtype), mask=mask)
        plgpu.store(k_rows.at[t, h, hi], k2.astype(k_rows.dtype), mask=mask)
    write(k_out, k_scales, h, mask, k1, k2)
    h, rows, mask = heads(num_heads + num_kv_heads, num_kv_heads)
    v1, v2 = (plgpu.load(qkv_ref.at[t, rows, cols], mask=mask, other=0) for cols in (lo, hi))
    if qmax is not None:
        v1, v2 = v1.astype(jnp.float32), v2.astype(jnp.float32)
    write(v_out, v_scales, h, mask, v1, v2)


def rope_and_write_kv(qkv, positions, inv_freq, k_pages, v_pages, layer, slot_mapping, *,
                      num_heads: int, k_scales=None, v_scales=None, new_k: bool = False,
                      interpret: bool = False):
    """(q rotated [T, H, D], k_pages, v_pages with layer `layer` written[, k_scales,
    v_scales][, k rotated [T, KVH, D] with `new_k`]), as `apply_rope` on qkv's q and k heads
    followed by `k_pages.at[layer, slot // page_size, slot % page_size].set(k)` (and v; for
    quantized pages, of quantize_vectors' values and scales), in one launch.
    A token whose slot repeats another's (padding) may leave either's rows."""
    tokens, all_heads, head_dim = qkv.shape
    kv_heads = k_pages.shape[3]
    if k_pages.shape != v_pages.shape or all_heads != num_heads + 2 * kv_heads:
        raise ValueError(f"qkv {qkv.shape} does not hold {num_heads} q heads and the pages' "
                         f"{kv_heads} KV heads twice (pages {k_pages.shape} / {v_pages.shape})")
    if head_dim % 2 or inv_freq.shape != (head_dim // 2,) or k_pages.shape[4] != head_dim:
        raise ValueError(f"head_dim {head_dim}: inv_freq {inv_freq.shape} and pages "
                         f"{k_pages.shape} must match it (and it must be even)")
    qmax = _QMAX.get(jnp.dtype(k_pages.dtype))
    scales = () if k_scales is None and v_scales is None else (k_scales, v_scales)
    if (qmax is None) != (not scales) or (scales and not all(
            s is not None and s.shape == k_pages.shape[:4] and s.dtype == jnp.float32
            for s in scales)):
        got = [getattr(s, "shape", s) for s in scales] or None
        raise ValueError(f"pages of {k_pages.dtype} take float32 k_scales and v_scales of "
                         f"shape {k_pages.shape[:4]} exactly when they are int8 or fp8 "
                         f"(got {got})")
    if new_k and scales:
        raise ValueError(f"new_k: the k rows as {k_pages.dtype} pages hold them are "
                         "dequantized values, which this kernel does not write")
    paged = (k_pages, v_pages, *scales)
    out_shape = (jax.ShapeDtypeStruct((tokens, num_heads, head_dim), qkv.dtype),
                 *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in paged))
    if new_k:
        out_shape += (jax.ShapeDtypeStruct((tokens, kv_heads, head_dim), qkv.dtype),)
    kernel = functools.partial(_kernel, num_heads=num_heads, num_kv_heads=kv_heads,
                               qmax=qmax, new_k=new_k)
    return pl.pallas_call(
        kernel, grid=(tokens,), out_shape=out_shape,
        input_output_aliases={5 + i: 1 + i for i in range(len(paged))},
        interpret=interpret, name="rope_kv_write",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(jnp.asarray(layer, jnp.int32).reshape(1), positions.astype(jnp.int32),
      slot_mapping.astype(jnp.int32), inv_freq.astype(jnp.float32), qkv, *paged)


rope_and_write_kv_interpret = functools.partial(rope_and_write_kv, interpret=True)
