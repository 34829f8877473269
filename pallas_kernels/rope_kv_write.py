"""RoPE on a step's q and k, and the new K/V rows written into the paged cache: one launch.

Inputs (one layer):
  qkv:          [num_tokens, num_heads + 2 * num_kv_heads, head_dim], the joined q/k/v
                projection's output (models/llama.py, fuse_qkv): q heads, then k, then v;
  positions:    [num_tokens] int32, each token's position (>= 0);
  inv_freq:     [head_dim // 2] float32 rotary inverse frequencies (models/rope.py);
  k_pages, v_pages: [num_layers, num_pages, page_size, num_kv_heads, head_dim], updated in
                place (the outputs alias them);
  slot_mapping: [num_tokens] int32, page * page_size + offset of each token (padding tokens
                point into the null page, page 0, which no sequence reads).
Output: q rotated, [num_tokens, num_heads, head_dim], and the pages with layer `layer`'s
slots holding each token's rotated k and its v.

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


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _kernel(layer_ref, pos_ref, slots_ref, inv_freq_ref, qkv_ref, k_in, v_in,
            q_out, k_out, v_out, *, num_heads: int, num_kv_heads: int):
    del k_in, v_in  # the same buffers as k_out, v_out
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

    h, rows, mask = heads(num_heads, num_kv_heads)
    r1, r2 = rotated(rows, mask)
    at = (layer, page, offset, h)
    plgpu.store(k_out.at[(*at, lo)], r1.astype(k_out.dtype), mask=mask)
    plgpu.store(k_out.at[(*at, hi)], r2.astype(k_out.dtype), mask=mask)

    _, rows, mask = heads(num_heads + num_kv_heads, num_kv_heads)
    for cols in (lo, hi):
        v = plgpu.load(qkv_ref.at[t, rows, cols], mask=mask, other=0)
        plgpu.store(v_out.at[(*at, cols)], v.astype(v_out.dtype), mask=mask)


def rope_and_write_kv(qkv, positions, inv_freq, k_pages, v_pages, layer, slot_mapping, *,
                      num_heads: int, interpret: bool = False):
    """(q rotated [T, H, D], k_pages, v_pages with layer `layer` written), as
    `apply_rope` on qkv's q and k heads followed by
    `k_pages.at[layer, slot // page_size, slot % page_size].set(k)` (and v), in one launch.
    A token whose slot repeats another's (padding) may leave either's rows."""
    tokens, all_heads, head_dim = qkv.shape
    kv_heads = k_pages.shape[3]
    if k_pages.shape != v_pages.shape or all_heads != num_heads + 2 * kv_heads:
        raise ValueError(f"qkv {qkv.shape} does not hold {num_heads} q heads and the pages' "
                         f"{kv_heads} KV heads twice (pages {k_pages.shape} / {v_pages.shape})")
    if head_dim % 2 or inv_freq.shape != (head_dim // 2,) or k_pages.shape[4] != head_dim:
        raise ValueError(f"head_dim {head_dim}: inv_freq {inv_freq.shape} and pages "
                         f"{k_pages.shape} must match it (and it must be even)")
    out_shape = (jax.ShapeDtypeStruct((tokens, num_heads, head_dim), qkv.dtype),
                 jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                 jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype))
    kernel = functools.partial(_kernel, num_heads=num_heads, num_kv_heads=kv_heads)
    return pl.pallas_call(
        kernel, grid=(tokens,), out_shape=out_shape, input_output_aliases={5: 1, 6: 2},
        interpret=interpret, name="rope_kv_write",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(jnp.asarray(layer, jnp.int32).reshape(1), positions.astype(jnp.int32),
      slot_mapping.astype(jnp.int32), inv_freq.astype(jnp.float32), qkv, k_pages, v_pages)


rope_and_write_kv_interpret = functools.partial(rope_and_write_kv, interpret=True)
