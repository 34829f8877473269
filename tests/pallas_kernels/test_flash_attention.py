"""Pallas (Triton) causal varlen flash attention against the plain-jnp reference
(cases and checks in tests/helpers/flash_cases.py). Each class runs in interpret mode (CPU)
and compiled (GPU only; skipped elsewhere).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from flash_cases import check, make_case, run_reference

from pallas_kernels.flash_attention import BlockSizes, flash_attention


@pytest.fixture(params=[pytest.param(True, id="interpret"),
                        pytest.param(False, id="compiled", marks=pytest.mark.gpu)])
def interpret(request):
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled Pallas Triton kernels need a GPU")
    return request.param


# GQA 4, head_dim 64, f32, 80 rows; all batches have 4 sequences so one compile per blocks.
CASE_A = functools.partial(make_case, num_tokens=80, num_heads=4, kv_heads=1, head_dim=64,
                           dtype=jnp.float32)
BATCHES_A = {
    "ragged": [0, 5, 37, 38, 61],  # unaligned starts, a 1-row sequence, 19 padding rows
    "aligned": [0, 16, 48, 64, 64],  # block-aligned starts, an empty sequence
    "one_long": [0, 80, 80, 80, 80],  # a single sequence filling every row
}
BLOCKS_A = {
    "q16_k16": BlockSizes(block_q=16, block_k=16),
    "q32_k16": BlockSizes(block_q=32, block_k=16, num_warps=4),
    "q16_k32": BlockSizes(block_q=16, block_k=32, num_stages=2),
}


class TestFlashAttention:
    @pytest.mark.parametrize("blocks", BLOCKS_A.keys())
    @pytest.mark.parametrize("batch", BATCHES_A.keys())
    def test_gqa4_block_sizes(self, interpret, blocks, batch):
        bad, clean, num_valid = CASE_A(sum(map(ord, batch)), BATCHES_A[batch])
        out = flash_attention(*bad, block_sizes=BLOCKS_A[blocks], interpret=interpret)
        check(out, run_reference(clean), num_valid, 1e-5)

    def test_gqa8_head_dim_128_bf16(self, interpret):
        bad, clean, num_valid = make_case(1, [0, 20, 64], num_tokens=64, num_heads=8,
                                          kv_heads=1, head_dim=128, dtype=jnp.bfloat16)
        out = flash_attention(*bad, block_sizes=BlockSizes(block_q=16, block_k=32),
                              interpret=interpret)
        assert out.dtype == jnp.bfloat16
        check(out, run_reference(clean), num_valid, 2e-2)

    @pytest.mark.parametrize("cu", [[0, 7, 50], [0, 7, 45]])
    def test_mha_rows_not_multiple_of_block(self, interpret, cu):
        bad, clean, num_valid = make_case(2, cu, num_tokens=50, num_heads=2, kv_heads=2,
                                          head_dim=64, dtype=jnp.float32)
        out = flash_attention(*bad, block_sizes=BlockSizes(block_q=32, block_k=16),
                              interpret=interpret)
        check(out, run_reference(clean), num_valid, 1e-5)


def _args(q=(32, 4, 64), k=(32, 2, 64), cu=(3,), cu_dtype=jnp.int32):
    return (jnp.ones(q, jnp.float32), jnp.ones(k, jnp.float32), jnp.ones(k, jnp.float32),
            jnp.zeros(cu, cu_dtype))


class TestInputChecks:
    @pytest.mark.parametrize("blocks, match", [
        (BlockSizes(block_q=24), r"block_q=24 must be a power of two >= 16"),
        (BlockSizes(block_k=8), r"block_k=8 must be a power of two >= 16"),
        (BlockSizes(num_warps=3), r"num_warps=3 must"),
        (BlockSizes(num_stages=0), r"num_stages=0 must"),
    ])
    def test_bad_block_sizes(self, blocks, match):
        with pytest.raises(ValueError, match=match):
            flash_attention(*_args(), block_sizes=blocks, interpret=True)

    @pytest.mark.parametrize("kw, match", [
        (dict(q=(32, 3, 64)), r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
        (dict(k=(16, 2, 64)), r"k rows and head_dim must match q"),
        (dict(q=(32, 4, 96), k=(32, 2, 96)), r"head_dim=96 must be a power of two"),
        (dict(cu=(1,)), r"cu_seqlens must be int32"),
        (dict(cu_dtype=jnp.float32), r"cu_seqlens must be int32"),
    ])
    def test_bad_shapes(self, kw, match):
        with pytest.raises(ValueError, match=match):
            flash_attention(*_args(**kw), interpret=True)


class TestTritonLowering:
    """Lowers the GPU path (Pallas -> Triton IR) for an abstract H100; needs no GPU."""

    @pytest.mark.parametrize("num_tokens, head_dim, dtype", [
        (4096, 128, jnp.bfloat16), (1000, 64, jnp.float32)])
    def test_lowers_for_cuda(self, num_tokens, head_dim, dtype):
        sds = jax.ShapeDtypeStruct
        args = (sds((num_tokens, 32, head_dim), dtype), sds((num_tokens, 8, head_dim), dtype),
                sds((num_tokens, 8, head_dim), dtype), sds((5,), jnp.int32))
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                             num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(flash_attention).trace(*args).lower(lowering_platforms=("cuda",))
        assert "__gpu$xla.gpu.triton" in lowered.as_text()
