"""Paged attention of decode tokens on a CPU with AVX-512, in float32: a C++ kernel
(cpu_decode_attention.cc) behind jax.ffi that reads each token's keys and values where they
lie in the page pool, for `ragged_paged_attention_reference`'s "token" formulation.

XLA runs that formulation as page gathers into blocks and multiply-reduce fusions: on the
demo's B=16 decode step about 19 ms of 46, for 3.6 MB of K and V a layer. The kernel walks
each (token, KV head) pair's keys in place: the scores of the query heads sharing the KV
head, an exact softmax (maximum, then exp and sum, in float32), and the weighted values. It
differs from the online softmax over blocks by rounding only
(tests/pallas_kernels/test_cpu_decode_attention.py). Float pages only: int8/fp8 pages keep
the jnp path. Built on first use (pallas_kernels/cpu_build.py); `available()` says whether
this machine runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_build

NAME = "cpu_decode_attention"
TARGET = f"jaxserve_{NAME}"
LANES = 16  # float32 lanes of a register: head_dim must be a multiple
MAX_HEAD_DIM = 256
MAX_GROUP = 16  # query heads per KV head


def available() -> bool:
    """Whether the kernel runs on this machine (built, loaded and registered on first ask)."""
    return cpu_build.register(NAME)


def takes(q, k_pages) -> bool:
    """Whether the kernel takes these shapes and dtypes (float32 pages, head_dim a multiple
    of 16 up to 256, at most 16 query heads per KV head)."""
    head_dim, group = q.shape[-1], q.shape[1] // k_pages.shape[3]
    return (q.dtype == jnp.float32 and k_pages.dtype == jnp.float32 and head_dim % LANES == 0
            and head_dim <= MAX_HEAD_DIM and 1 <= group <= MAX_GROUP
            and q.shape[1] % k_pages.shape[3] == 0)


def cpu_decode_attention(q, k_pages, v_pages, layer, tables, pos, *, sm_scale: float):
    """out [T, H, D] float32: token t's query q [T, H, D] over the keys 0..pos[t] of its page
    table row tables [T, P] in layer `layer` of k_pages, v_pages [L, N, page_size, KVH, D];
    pos[t] < 0 (padding) gives zeros. Call only where `takes(q, k_pages)`; the kernel is
    registered on first use (a RuntimeError where `available()` is False)."""
    if not takes(q, k_pages) or v_pages.shape != k_pages.shape or q.ndim != 3 \
            or k_pages.ndim != 5 or k_pages.shape[4] != q.shape[2]:
        raise ValueError(f"cpu_decode_attention: q {q.shape} {q.dtype} and pages "
                         f"{k_pages.shape} {k_pages.dtype} do not fit the kernel")
    if tables.shape[0] != q.shape[0] or pos.shape != (q.shape[0],):
        raise ValueError(f"cpu_decode_attention: a table row and a position per token, got "
                         f"{tables.shape} and {pos.shape} for {q.shape[0]} tokens")
    cpu_build.require(NAME)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(
        q, k_pages, v_pages, jnp.asarray(layer, jnp.int32), tables.astype(jnp.int32),
        pos.astype(jnp.int32), sm_scale=np.float32(sm_scale))
