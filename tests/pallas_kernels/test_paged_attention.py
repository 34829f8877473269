"""Pallas ragged paged attention against the plain-jnp reference.

Every case runs on a poisoned cache: layer 0, pages no sequence owns and slots past each
sequence's length are NaN, and so are the padding query rows. The reference gets the same
inputs with finite random values there instead. The kernel's valid rows must match the
reference, padding rows must be exactly zero, and nothing may be NaN.
Each class runs in interpret mode (CPU) and compiled (GPU only; skipped elsewhere).
Shapes within a class are fixed so that jit compiles each block-size config once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.quant import quantize_vectors
from pallas_kernels.paged_attention import (
    FEW_TOKENS,
    BlockSizes,
    decode_splits,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

SM_SCALE = 0.125
LAYER = 1
NUM_LAYERS = 2


@pytest.fixture(params=[pytest.param(True, id="interpret"),
                        pytest.param(False, id="compiled", marks=pytest.mark.gpu)])
def interpret(request):
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled Pallas Triton kernels need a GPU")
    return request.param


def make_case(seed, q_lens, seq_lens, *, num_tokens, num_heads, kv_heads, head_dim,
              page_size, pages_per_seq, num_pages, dtype):
    """Random (poisoned_args, clean_args, num_valid_tokens) for one ragged batch."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    query_start = np.zeros(num_seqs + 1, np.int32)
    query_start[1:] = np.cumsum(q_lens)
    assert query_start[-1] <= num_tokens
    need = [-(-n // page_size) for n in seq_lens]
    assert all(n <= pages_per_seq for n in need) and sum(need) <= num_pages
    # Table entries past a sequence's length point at arbitrary (poisoned) pages.
    tables = rng.integers(0, num_pages, (num_seqs, pages_per_seq)).astype(np.int32)
    live = np.zeros((num_pages, page_size), bool)  # slots holding some sequence's keys
    order, used = rng.permutation(num_pages), 0
    for s, (n_pages, length) in enumerate(zip(need, seq_lens, strict=True)):
        tables[s, :n_pages] = order[used:used + n_pages]
        used += n_pages
        for pos in range(length):
            live[tables[s, pos // page_size], pos % page_size] = True

    shape = (NUM_LAYERS, num_pages, page_size, kv_heads, head_dim)
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    q_bad, k_bad, v_bad = q.copy(), k.copy(), v.copy()
    q_bad[query_start[-1]:] = np.nan
    for a in (k_bad, v_bad):
        a[:LAYER] = np.nan
        a[LAYER][~live] = np.nan
    meta = (jnp.int32(LAYER), jnp.asarray(tables), jnp.asarray(np.asarray(seq_lens, np.int32)),
            jnp.asarray(query_start))

    def pack(*arrays):
        return (*(jnp.asarray(a, dtype) for a in arrays), *meta)

    return pack(q_bad, k_bad, v_bad), pack(q, k, v), int(query_start[-1])


def check(out, ref, num_valid, tol):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert not np.isnan(out).any(), "kernel output has NaN (read a poisoned slot)"
    np.testing.assert_array_equal(out[num_valid:], 0.0, err_msg="padding rows must be zero")
    np.testing.assert_allclose(out[:num_valid], ref[:num_valid], rtol=tol, atol=tol)


def run_reference(clean):
    with jax.default_matmul_precision("highest"):
        return ragged_paged_attention_reference(*clean, sm_scale=SM_SCALE)


def run_kernel(args, block_sizes, interpret):
    return ragged_paged_attention(*args, sm_scale=SM_SCALE, block_sizes=block_sizes,
                                  interpret=interpret)


# Grouped-query ratio 4, head_dim 64, page_size 8, f32: one shape, several block sizes.
CASE_A = functools.partial(make_case, num_tokens=48, num_heads=8, kv_heads=2, head_dim=64,
                           page_size=8, pages_per_seq=8, num_pages=40, dtype=jnp.float32)
BATCHES_A = {
    # decode at/over page boundaries, prefill with and without history, a 4-token chunk,
    # a zero-length padding sequence, and 20 padding token rows
    "mixed": ([1, 13, 0, 1, 4, 9], [37, 13, 0, 8, 20, 64]),
    "decode": ([1, 1, 1, 1, 1, 1], [1, 7, 8, 9, 33, 64]),
    # one chunk without history, one after 17 cached tokens, an idle sequence (no tokens)
    "prefill": ([16, 0, 23, 0, 0, 0], [16, 5, 40, 0, 0, 0]),
    # one sequence decoding in a bucket of six (the others empty), over every split
    "sparse_decode": ([1, 0, 0, 0, 0, 0], [61, 0, 0, 0, 0, 0]),
}
BLOCKS_A = {
    "no_split": BlockSizes(block_q=4, block_q_decode=4, block_kv=16, block_kv_decode=16,
                           num_kv_splits=1),
    "split2": BlockSizes(block_q=8, block_q_decode=4, block_kv=32, block_kv_decode=16,
                         num_kv_splits=2),
    "split4_wide": BlockSizes(block_q=4, block_q_decode=8, block_kv=16, block_kv_decode=32,
                              num_kv_splits=4),
    # 4 splits, of which 6 // (decode rows x 2 KV heads) run, at least 2: 3 for
    # sparse_decode, 2 for decode and mixed (prefill has no decode rows); the partials of the
    # rest are never written (NaN in interpret mode) nor read
    "split4_run_fewer": BlockSizes(block_q=4, block_q_decode=4, block_kv=16,
                                   block_kv_decode=16, num_kv_splits=4, decode_programs=6),
}


class TestRaggedPagedAttention:
    @pytest.mark.parametrize("blocks", BLOCKS_A.keys())
    @pytest.mark.parametrize("batch", BATCHES_A.keys())
    def test_gqa4_block_sizes(self, interpret, blocks, batch):
        bad, clean, num_valid = CASE_A(sum(map(ord, batch)), *BATCHES_A[batch])
        out = run_kernel(bad, BLOCKS_A[blocks], interpret)
        check(out, run_reference(clean), num_valid, 1e-5)

    @pytest.mark.parametrize("blocks", ["no_split", "split4_wide", "split4_run_fewer"])
    @pytest.mark.parametrize("batch", ["decode", "sparse_decode"])
    def test_decode_only_skips_nothing_a_decode_needs(self, interpret, blocks, batch):
        bad, clean, num_valid = CASE_A(sum(map(ord, batch)), *BATCHES_A[batch])
        out = ragged_paged_attention(*bad, sm_scale=SM_SCALE, block_sizes=BLOCKS_A[blocks],
                                     interpret=interpret, decode_only=True)
        check(out, run_reference(clean), num_valid, 1e-5)

    @pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float32])
    def test_gqa8_head_dim_128_bf16_cache(self, interpret, q_dtype):
        # group 8 -> decode tile 2 tokens x 8 heads, prefill tile 16 x 8; auto split-K.
        # A float32 q over a bfloat16 cache runs in bfloat16 and returns float32.
        bad, clean, num_valid = make_case(
            1, [1, 2, 11, 3], [50, 17, 30, 64], num_tokens=24, num_heads=8, kv_heads=1,
            head_dim=128, page_size=16, pages_per_seq=4, num_pages=16, dtype=jnp.bfloat16)
        bad = (bad[0].astype(q_dtype), *bad[1:])
        clean = (clean[0].astype(q_dtype), *clean[1:])
        blocks = BlockSizes(block_kv=16, block_kv_decode=16)
        out = run_kernel(bad, blocks, interpret)
        assert out.dtype == q_dtype
        check(out, run_reference(clean), num_valid, 2e-2)

    def test_mha_default_blocks(self, interpret):
        # group 1: decode tile 16 tokens x 1 head; a 17-token chunk goes to the prefill phase.
        bad, clean, num_valid = make_case(
            2, [1, 17, 1], [5, 40, 64], num_tokens=20, num_heads=2, kv_heads=2, head_dim=64,
            page_size=16, pages_per_seq=4, num_pages=12, dtype=jnp.float32)
        out = run_kernel(bad, BlockSizes(), interpret)
        check(out, run_reference(clean), num_valid, 1e-5)

    def test_group_not_power_of_two(self, interpret):
        # 6 query heads over 2 KV heads (SmolLM2 has 9 over 3): heads padded to 4 and masked.
        bad, clean, num_valid = make_case(
            3, [1, 6, 2], [11, 30, 48], num_tokens=16, num_heads=6, kv_heads=2, head_dim=64,
            page_size=8, pages_per_seq=6, num_pages=24, dtype=jnp.float32)
        blocks = BlockSizes(block_q=4, block_q_decode=4, block_kv=16, block_kv_decode=16,
                            num_kv_splits=2)
        out = run_kernel(bad, blocks, interpret)
        check(out, run_reference(clean), num_valid, 1e-5)


class TestBlockSizes:
    def test_auto_split_k_follows_batch(self):
        resolve = functools.partial(BlockSizes().resolve, group=4, kv_heads=8,
                                    max_kv_len=32768)
        assert resolve(num_seqs=1).num_kv_splits == 16
        assert resolve(num_seqs=32).num_kv_splits == 8
        assert resolve(num_seqs=64).num_kv_splits == 4
        assert resolve(num_seqs=128).num_kv_splits == 2
        assert resolve(num_seqs=256).num_kv_splits == 1
        short = BlockSizes().resolve(group=4, kv_heads=8, num_seqs=1, max_kv_len=128)
        assert short.num_kv_splits == 2  # never more splits than key blocks

    def test_splits_that_run_follow_filled_rows(self):
        def run(tokens, kv_heads=8, num_splits=8, decode_programs=512):
            return int(decode_splits(jnp.asarray(tokens, jnp.int32), kv_heads, num_splits,
                                     decode_programs))
        assert run([1] + [0] * 31) == 8  # 64 wanted, capped by the static count
        assert run([1] * 8 + [0] * 24) == 8
        assert run([1] * 16 + [0] * 16) == 4
        assert run([1] * 32) == 2
        assert run([1] * 20 + [0] * 12) == 3  # 512 // 160
        assert run([1] * 64) == 2  # never fewer than two
        assert run([1] * 128, num_splits=2) == 2
        assert run([0] * 32) == 8  # nothing to run: any count serves
        assert run([1] * 32, decode_programs=None) == 8  # all of them
        assert run([1] * 32, decode_programs=1024) == 4
        assert run([1] * 32, num_splits=1) == 1

    def test_auto_tiles_reach_16_rows(self):
        for group, decode, prefill in [(1, 16, 128), (3, 4, 32), (4, 4, 32), (8, 2, 16),
                                       (32, 1, 4)]:
            bs = BlockSizes().resolve(group=group, num_seqs=4, kv_heads=2, max_kv_len=512)
            assert (bs.block_q_decode, bs.block_q) == (decode, prefill)


def _small_args(**over):
    shapes = dict(q=(8, 8, 64), k=(2, 4, 8, 2, 64), tables=(2, 3), seq_lens=(2,), qs=(3,))
    shapes.update(over)
    return (jnp.ones(shapes["q"], jnp.float32), jnp.ones(shapes["k"], jnp.float32),
            jnp.ones(shapes["k"], jnp.float32), 0, jnp.zeros(shapes["tables"], jnp.int32),
            jnp.zeros(shapes["seq_lens"], jnp.int32), jnp.zeros(shapes["qs"], jnp.int32))


class TestInputChecks:
    @pytest.mark.parametrize("blocks, match", [
        (BlockSizes(block_q=3), r"block_q=3 must be a power of two"),
        (BlockSizes(block_q=2), r"block_q=2 must be .* >= 16"),  # 2 tokens x 4 heads
        (BlockSizes(block_q_decode=1), r"block_q_decode=1 must"),
        (BlockSizes(block_kv=8), r"block_kv=8 must be a power of two >= 16"),
        (BlockSizes(block_kv_decode=48), r"block_kv_decode=48 must"),
        (BlockSizes(block_kv_decode=0), r"block_kv_decode=0 must"),
        (BlockSizes(num_kv_splits=3), r"num_kv_splits=3 must"),
        (BlockSizes(num_warps=6), r"num_warps=6 must"),
        (BlockSizes(num_stages_decode=0), r"num_stages_decode=0 must"),
        (BlockSizes(decode_programs=0), r"decode_programs=0 must be None or an int >= 1"),
    ])
    def test_bad_block_sizes(self, blocks, match):
        with pytest.raises(ValueError, match=match):
            ragged_paged_attention(*_small_args(), sm_scale=1.0, block_sizes=blocks,
                                   interpret=True)

    @pytest.mark.parametrize("over, match", [
        (dict(q=(8, 6, 64), k=(2, 4, 8, 4, 64)), r"num_q_heads \(6\) must be a multiple"),
        (dict(q=(8, 8, 32)), r"head_dim of q \(32\) and k_pages \(64\) differ"),
        (dict(q=(8, 8, 48), k=(2, 4, 8, 2, 48)), r"head_dim=48 must be a power of two"),
        (dict(k=(4, 8, 2, 64)), r"k_pages must be \[num_layers"),
        (dict(seq_lens=(3,)), r"seq_lens must be int32 \[2\]"),
        (dict(qs=(2,)), r"query_start must be int32 \[3\]"),
    ])
    def test_bad_shapes(self, over, match):
        with pytest.raises(ValueError, match=match):
            ragged_paged_attention(*_small_args(**over), sm_scale=1.0, interpret=True)

    def test_bad_dtypes(self):
        q, k, v, layer, tables, seq_lens, qs = _small_args()
        with pytest.raises(ValueError, match=r"k_pages and v_pages must share a dtype"):
            ragged_paged_attention(q, k, v.astype(jnp.bfloat16), layer, tables, seq_lens, qs,
                                   sm_scale=1.0)
        with pytest.raises(ValueError, match=r"q dtype int32 must be"):
            ragged_paged_attention(q.astype(jnp.int32), k, v, layer, tables, seq_lens, qs,
                                   sm_scale=1.0)
        with pytest.raises(ValueError, match=r"page_tables must be int32"):
            ragged_paged_attention(q, k, v, layer, tables.astype(jnp.float32), seq_lens, qs,
                                   sm_scale=1.0)


class TestTritonLowering:
    """Lowers the GPU path (Pallas -> Triton IR) for an abstract H100; needs no GPU."""

    @pytest.mark.parametrize("num_seqs, num_heads, kv_heads, head_dim, dtype", [
        (8, 32, 8, 128, jnp.bfloat16),  # auto split-K 4 + combine kernel
        (64, 32, 4, 128, jnp.bfloat16),  # no split
        (4, 9, 3, 64, jnp.float32),  # SmolLM2 heads, padded group
    ])
    def test_lowers_for_cuda(self, num_seqs, num_heads, kv_heads, head_dim, dtype):
        sds = jax.ShapeDtypeStruct
        pool = sds((2, 1024, 16, kv_heads, head_dim), dtype)
        args = (sds((256, num_heads, head_dim), dtype), pool, pool, sds((), jnp.int32),
                sds((num_seqs, 64), jnp.int32), sds((num_seqs,), jnp.int32),
                sds((num_seqs + 1,), jnp.int32))
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                             num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        fn = functools.partial(ragged_paged_attention, sm_scale=0.1)
        with jax.sharding.use_abstract_mesh(mesh):
            hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert hlo.count("__gpu$xla.gpu.triton") >= 2


@pytest.mark.parametrize("formulation,window", [("sequence", 64), ("window", 64),
                                                ("window", 5)])
@pytest.mark.parametrize("batch", BATCHES_A)
def test_reference_formulations_agree(batch, formulation, window):
    """Per-token gathers (decode), per-sequence blocks and per-sequence windows (prefill
    chunks) give the same attention on every kind of batch; a window of 5 tokens splits
    every prefill into several windows."""
    _, clean, num_valid = CASE_A(3, *BATCHES_A[batch])
    with jax.default_matmul_precision("highest"):
        per_token = ragged_paged_attention_reference(*clean, sm_scale=SM_SCALE,
                                                     formulation="token")
        other = ragged_paged_attention_reference(*clean, sm_scale=SM_SCALE,
                                                 formulation=formulation, window=window)
    np.testing.assert_allclose(np.asarray(other)[:num_valid],
                               np.asarray(per_token)[:num_valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(other)[num_valid:], 0.0)


def _first_decodes(args, n):
    """The first n sequences of a "decode" batch (one token each) as a call of n tokens."""
    q, k, v, layer, tables, seq_lens, _ = args
    return (q[:n], k, v, layer, tables[:n], seq_lens[:n], jnp.arange(n + 1, dtype=jnp.int32))


@pytest.mark.parametrize("quantized", [None, "int8", "fp8"])
@pytest.mark.parametrize("n", [1, 4])
def test_reference_few_decodes_read_heads_apart(n, quantized):
    """A call of at most FEW_TOKENS decodes gathers each KV head's slice of a page, in blocks
    of twice the pages; a larger call gathers whole pages. Both give the same attention: a
    call of the first n decodes against the same rows of the six-decode batch, over several
    blocks (1 page a block in the large call, 2 in the small one; the longest sequence
    has 8 pages)."""
    assert n <= FEW_TOKENS < 6
    if quantized:
        _, _, (args, (ks, vs)), _, _ = quantized_case(7, "decode", quantized)
        scales = dict(k_scales=ks, v_scales=vs)
    else:
        args, scales = CASE_A(7, *BATCHES_A["decode"])[1], {}
    seq_lens = np.asarray(args[5])
    order = np.argsort(-seq_lens)  # the longest sequences first: the first n span blocks
    args = (args[0][order], *args[1:4], args[4][order], args[5][order], args[6])
    with jax.default_matmul_precision("highest"):
        run = functools.partial(ragged_paged_attention_reference, sm_scale=SM_SCALE,
                                decode_pages_per_block=1, formulation="token", **scales)
        every = np.asarray(run(*args))
        few = np.asarray(run(*_first_decodes(args, n)))
    assert few.shape == (n, *every.shape[1:])
    np.testing.assert_allclose(few, every[:n], rtol=1e-5, atol=1e-5)


def _new_rows(args, num_valid, page_size):
    """This step's K/V rows as the model passes them (k_new, v_new [T, KVH, D]): each valid
    token's key and value, read from its slot in the pages; padding rows huge but finite."""
    _, k, v, layer, tables, seq_lens, qs = (np.asarray(a) for a in args)
    slots = []
    for s in range(len(seq_lens)):
        for t in range(qs[s], qs[s + 1]):
            pos = seq_lens[s] - (qs[s + 1] - t)
            slots.append((tables[s, pos // page_size], pos % page_size))
    page, offset = np.array(slots).T
    rows = []
    for a in (k, v):
        new = np.full((args[0].shape[0], *a.shape[3:]), 1e4, np.float32)
        new[:num_valid] = a[layer, page, offset]
        rows.append(new)
    return rows


def test_reference_takes_prefill_chunks_keys_from_new_rows():
    """With this step's K/V rows, the window formulation takes a prefill chunk's own keys
    from the rows (its history from the pages), in windows of 128 (a 130-token prompt, a
    20-token chunk after 30 cached tokens) or of 256 (a 300-token chunk); decodes and
    chunks of up to 8 tokens read the pages: the same attention as the per-token gathers.
    Changing a chunk's rows changes its output and nothing else's, so the rows are what it
    reads."""
    # 300 tokens after 150 (three blocks of history), a fresh 130, a decode, 20 tokens after
    # 30, a fresh 5-token prompt (a small window: pages), an idle sequence, 144 padding rows
    q_lens, seq_lens = [300, 130, 1, 20, 5, 0], [450, 130, 37, 50, 5, 0]
    _, clean, num_valid = make_case(7, q_lens, seq_lens, num_tokens=600, num_heads=8,
                                    kv_heads=2, head_dim=64, page_size=8, pages_per_seq=64,
                                    num_pages=120, dtype=jnp.float32)
    k_new, v_new = _new_rows(clean, num_valid, page_size=8)
    with jax.default_matmul_precision("highest"):
        per_token = ragged_paged_attention_reference(*clean, sm_scale=SM_SCALE,
                                                     formulation="token")
        rows = functools.partial(ragged_paged_attention_reference, *clean, sm_scale=SM_SCALE,
                                 formulation="window")
        out = rows(k_new=jnp.asarray(k_new), v_new=jnp.asarray(v_new))
        k_new[300:430] *= 2.0  # the 130-token prompt's keys and the 20-token chunk's,
        k_new[431:451] *= 2.0  # in the rows only
        changed = np.asarray(rows(k_new=jnp.asarray(k_new), v_new=jnp.asarray(v_new)))
    np.testing.assert_allclose(np.asarray(out)[:num_valid],
                               np.asarray(per_token)[:num_valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[num_valid:], 0.0)
    differs = np.abs(changed - np.asarray(out)).max(axis=(1, 2)) > 1e-3
    # row 300 attends only to its own key (one key: any scale gives the same output)
    assert differs[301:430].all() and differs[431:451].all()
    assert not differs[:301].any() and not differs[430] and not differs[451:].any()


# ----- quantized pages (cache.kv_dtype int8 / fp8) ----------------------------------------

def quantized_case(seed, batch, mode):
    """(poisoned kernel args, poisoned scales, (reference args, scales), reference args on the
    dequantized pages, num_valid): int8 or fp8 pages with one float32 scale per (token, KV
    head); dead slots' scales are NaN, and so are their fp8 entries."""
    bad, clean, num_valid = CASE_A(seed, *BATCHES_A[batch])
    q, k, v = clean[:3]
    (kq, ks), (vq, vs) = quantize_vectors(k, mode), quantize_vectors(v, mode)
    dead = jnp.isnan(bad[1][..., 0])  # [L, N, page_size, KVH]: slots no sequence owns
    poison = (lambda x: x) if mode == "int8" else (  # float8_e4m3fn has a NaN
        lambda x: jnp.where(dead[..., None], jnp.nan, x.astype(jnp.float32)).astype(x.dtype))
    poisoned = (bad[0], poison(kq), poison(vq), *bad[3:])
    scales = (jnp.where(dead, jnp.nan, ks), jnp.where(dead, jnp.nan, vs))
    dequantized = (q, kq.astype(jnp.float32) * ks[..., None],
                   vq.astype(jnp.float32) * vs[..., None], *clean[3:])
    return poisoned, scales, (clean[:1] + (kq, vq) + clean[3:], (ks, vs)), dequantized, \
        num_valid


class TestQuantizedPages:
    @pytest.mark.parametrize("mode", ["int8", "fp8"])
    @pytest.mark.parametrize("blocks", ["no_split", "split2"])
    @pytest.mark.parametrize("batch", BATCHES_A.keys())
    def test_matches_the_reference_on_dequantized_pages(self, interpret, mode, blocks, batch):
        poisoned, scales, (ref_args, ref_scales), dequantized, num_valid = quantized_case(
            5, batch, mode)
        want = run_reference(dequantized)
        out = ragged_paged_attention(*poisoned, sm_scale=SM_SCALE, block_sizes=BLOCKS_A[blocks],
                                     interpret=interpret, k_scales=scales[0],
                                     v_scales=scales[1])
        check(out, want, num_valid, 2e-5)
        # the reference's own quantized path: the same sums
        with jax.default_matmul_precision("highest"):
            ref = ragged_paged_attention_reference(*ref_args, sm_scale=SM_SCALE,
                                                   k_scales=ref_scales[0],
                                                   v_scales=ref_scales[1])
        np.testing.assert_allclose(np.asarray(ref)[:num_valid], np.asarray(want)[:num_valid],
                                   rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("v_size", [1.0, 1e-6])
    def test_fp8_pages_with_a_bfloat16_q(self, interpret, v_size):
        """A bfloat16 q over fp8 pages runs in float16. V a million times smaller (scales
        near 1e-8, so p * v_scale would underflow float16) keeps its relative accuracy."""
        poisoned, (k_scales, v_scales), _, dequantized, num_valid = quantized_case(
            5, "mixed", "fp8")
        q = poisoned[0].astype(jnp.bfloat16)
        want = run_reference((q.astype(jnp.float32), dequantized[1], dequantized[2] * v_size,
                              *dequantized[3:]))
        out = ragged_paged_attention(q, *poisoned[1:], sm_scale=SM_SCALE,
                                     block_sizes=BLOCKS_A["split2"], interpret=interpret,
                                     k_scales=k_scales, v_scales=v_scales * v_size)
        assert out.dtype == jnp.bfloat16
        check(out.astype(jnp.float32) / v_size, want / v_size, num_valid, 2e-2)

    def test_bad_scales(self):
        q, k, v, layer, tables, seq_lens, qs = _small_args()
        kq = k.astype(jnp.int8)
        scales = jnp.ones(k.shape[:4], jnp.float32)
        with pytest.raises(ValueError, match="int8 and float8_e4m3fn pages need k_scales"):
            ragged_paged_attention(q, kq, kq, layer, tables, seq_lens, qs, sm_scale=1.0)
        with pytest.raises(ValueError, match="k_scales and v_scales come together"):
            ragged_paged_attention(q, kq, kq, layer, tables, seq_lens, qs, sm_scale=1.0,
                                   k_scales=scales)
        with pytest.raises(ValueError, match=r"v_scales must be float32"):
            ragged_paged_attention(q, kq, kq, layer, tables, seq_lens, qs, sm_scale=1.0,
                                   k_scales=scales, v_scales=scales[..., :1])

    @pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
    def test_lowers_for_cuda(self, dtype):
        sds = jax.ShapeDtypeStruct
        pool, scale = sds((2, 1024, 16, 8, 128), dtype), sds((2, 1024, 16, 8), jnp.float32)
        args = (sds((256, 32, 128), jnp.bfloat16), pool, pool, sds((), jnp.int32),
                sds((8, 64), jnp.int32), sds((8,), jnp.int32), sds((9,), jnp.int32))
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                             num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        fn = functools.partial(ragged_paged_attention, sm_scale=0.1)
        with jax.sharding.use_abstract_mesh(mesh):
            hlo = jax.jit(fn).trace(*args, k_scales=scale, v_scales=scale).lower(
                lowering_platforms=("cuda",)).as_text()
        assert hlo.count("__gpu$xla.gpu.triton") >= 2
