"""Mosaic GPU causal varlen flash attention against the plain-jnp reference (cases and
checks in tests/helpers/flash_cases.py). Runs in Mosaic GPU's interpret mode on CPU, and
compiled on a GPU (skipped elsewhere)."""

import jax
import jax.numpy as jnp
import pytest
from flash_cases import check, make_case, run_reference

from pallas_kernels.flash_attention_mgpu import BlockSizes, flash_attention_mgpu


@pytest.fixture(params=[pytest.param(True, id="interpret"),
                        pytest.param(False, id="compiled", marks=pytest.mark.gpu)])
def interpret(request):
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled Mosaic GPU kernels need a GPU")
    return request.param


CASES = {
    # 80 rows (padded to one tile of 128 inside), unaligned starts, a 1-row sequence,
    # 19 padding rows; GQA 4, head_dim 64, blocks of 64 keys
    "ragged_gqa4": (dict(num_tokens=80, num_heads=4, kv_heads=1, head_dim=64,
                         dtype=jnp.bfloat16), [0, 5, 37, 38, 61], BlockSizes(64, 2)),
    # three tiles; sequences start inside the second consumer's rows, so it skips blocks
    # the first one needs; an empty sequence; head_dim 128, blocks of 128, three stages
    "tiles_skip_hd128": (dict(num_tokens=300, num_heads=4, kv_heads=2, head_dim=128,
                              dtype=jnp.bfloat16), [0, 100, 137, 200, 200, 290],
                         BlockSizes(128, 3)),
    # one sequence over two tiles: blocks wholly inside the window run unmasked; float16
    "one_long_f16": (dict(num_tokens=256, num_heads=2, kv_heads=2, head_dim=64,
                          dtype=jnp.float16), [0, 256], BlockSizes(64, 2)),
}


@pytest.mark.parametrize("name", CASES.keys())
def test_matches_reference(interpret, name):
    shape, cu, blocks = CASES[name]
    bad, clean, num_valid = make_case(sum(map(ord, name)), cu, **shape)
    out = flash_attention_mgpu(*bad, block_sizes=blocks, interpret=interpret)
    assert out.shape == bad[0].shape and out.dtype == shape["dtype"]
    check(out, run_reference(clean), num_valid, 2e-2)


def _args(q=(128, 4, 64), k=(128, 2, 64), dtype=jnp.bfloat16, cu_dtype=jnp.int32):
    return (jnp.ones(q, dtype), jnp.ones(k, dtype), jnp.ones(k, dtype),
            jnp.zeros((3,), cu_dtype))


@pytest.mark.parametrize("args, blocks, match", [
    (_args(dtype=jnp.float32), BlockSizes(), r"float32'\) must be one of bfloat16, float16"),
    (_args(q=(128, 4, 96), k=(128, 2, 96)), BlockSizes(), r"head_dim=96 must be 64 or 128"),
    (_args(q=(128, 3, 64)), BlockSizes(), r"num_q_heads \(3\) must be a multiple of "
                                          r"num_kv_heads \(2\)"),
    (_args(cu_dtype=jnp.float32), BlockSizes(), r"cu_seqlens must be int32"),
    (_args(), BlockSizes(block_kv=32), r"block_kv=32 must be 64 or 128"),
    (_args(), BlockSizes(num_stages=1), r"num_stages=1 must be an int >= 2"),
    (_args(q=(128, 4, 128), k=(128, 2, 128)), BlockSizes(128, 4),
     r"needs 294912 bytes of shared memory for head_dim=128"),
])
def test_bad_inputs(args, blocks, match):
    with pytest.raises(ValueError, match=match):
        flash_attention_mgpu(*args, block_sizes=blocks, interpret=True)
