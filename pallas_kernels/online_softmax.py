"""Building blocks shared by the attention kernels: the masking value, masked loads, the
f32-accumulating dot and one block of the online softmax (in the exp2 domain)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

# Finite, so that fully masked blocks never produce inf - inf.
DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def is_pow2(x) -> bool:
    return isinstance(x, int) and x >= 1 and x & (x - 1) == 0


def load(ref_view, mask=None, other=0):
    if mask is None:
        return plgpu.load(ref_view)
    return plgpu.load(ref_view, mask=mask, other=other)


def dot(a, b, b_contract: int):
    """a [M, K] . b -> [M, N] float32; b is [N, K] (b_contract=1) or [K, N] (0)."""
    return lax.dot_general(a, b, (((1,), (b_contract,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def softmax_step(q, k, v, carry, mask, scale, k_scale=None, v_scale=None):
    """One online-softmax block: q [R, D] against k, v [BK, D]; mask [R, BK] or None.

    k_scale, v_scale [BK]: a quantized cache's per-key scales. Key j's score is
    (q . k_j) * k_scale[j], and its value enters as p_j * v_scale[j] times v_j, so the
    quantized K/V are never scaled element by element. With float16 v, p * v_scale is
    first divided by the block's largest v_scale, so that small scales do not underflow
    float16 (the quotient is in [0, 1], like p in a float16 flash attention)."""
    m, denom, acc = carry  # [R], [R], [R, D] float32; m in the exp2 domain
    s = dot(q, k, 1) * scale
    if k_scale is not None:
        s = s * k_scale[None, :]
    if mask is not None:
        s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp2(m - m_new)
    denom = alpha * denom + p.sum(axis=1)
    if v_scale is None:
        pv = dot(p.astype(v.dtype), v, 0)
    elif v.dtype == jnp.float16:
        top = jnp.maximum(v_scale.max(), 1e-30)
        pv = top * dot((p * (v_scale / top)[None, :]).astype(v.dtype), v, 0)
    else:
        pv = dot((p * v_scale[None, :]).astype(v.dtype), v, 0)
    acc = alpha[:, None] * acc + pv
    return m_new, denom, acc
