"""Packed varlen attention cases shared by the flash kernels' tests.

Padding rows (past cu_seqlens[-1]) of q, k and v are NaN for the kernel and random for the
reference: valid rows must match, padding rows must be exactly zero, nothing may be NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import flash_attention_reference


def make_case(seed, cu_seqlens, *, num_tokens, num_heads, kv_heads, head_dim, dtype):
    """Random (poisoned_args, clean_args, num_valid_rows)."""
    rng = np.random.default_rng(seed)
    clean = [rng.standard_normal((num_tokens, h, head_dim)).astype(np.float32)
             for h in (num_heads, kv_heads, kv_heads)]
    num_valid = cu_seqlens[-1]
    bad = [a.copy() for a in clean]
    for a in bad:
        a[num_valid:] = np.nan
    cu = jnp.asarray(np.asarray(cu_seqlens, np.int32))

    def pack(arrays):
        return (*(jnp.asarray(a, dtype) for a in arrays), cu)

    return pack(bad), pack(clean), num_valid


def check(out, ref, num_valid, tol):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert not np.isnan(out).any(), "kernel output has NaN (read a padding row)"
    np.testing.assert_array_equal(out[num_valid:], 0.0, err_msg="padding rows must be zero")
    np.testing.assert_allclose(out[:num_valid], ref[:num_valid], rtol=tol, atol=tol)


def run_reference(clean):
    with jax.default_matmul_precision("highest"):
        return flash_attention_reference(*clean)
