"""On-device sampling on crafted logits: exclusions hold, seeds reproduce, penalties exact."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.sampling import (
    SamplingInputs,
    _filter_top_k_top_p,
    apply_penalties,
    argmax,
    sample,
    top_k_by_blocks,
)

V = 8
sample_jit = jax.jit(sample, static_argnames="num_top")


def inputs(n, **kw):
    base = dict(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, seeds=0, output_index=0,
                num_logprobs=3)
    base.update(kw)
    arrays = {}
    for k, v in base.items():
        dtype = {"top_k": jnp.int32, "seeds": jnp.uint32, "output_index": jnp.int32,
                 "num_logprobs": jnp.int32}.get(
            k, jnp.float32)
        arrays[k] = jnp.broadcast_to(jnp.asarray(v, dtype), (n,))
    return SamplingInputs(banned=kw.pop("banned", jnp.full((n, 2), -1, jnp.int32)), **arrays)


def draw(logits, n=512, **kw):
    """n rows of the same logits with seeds 0..n-1; returns the sampled tokens."""
    banned = kw.pop("banned", None)
    p = inputs(n, seeds=jnp.arange(n, dtype=jnp.uint32), **kw)
    if banned is not None:
        p = SamplingInputs(**{**p.__dict__, "banned": jnp.broadcast_to(
            jnp.asarray(banned, jnp.int32), (n, len(banned)))})
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V))
    none = jnp.zeros((n, V), bool)
    return np.asarray(sample_jit(lg, none, jnp.zeros((n, V), jnp.int32), p, num_top=3).tokens)


PROBS = np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01])
LOGITS = np.log(PROBS)


def test_greedy_is_argmax():
    assert set(draw(LOGITS[::-1], temperature=0.0).tolist()) == {V - 1}


@pytest.mark.parametrize(("kw", "allowed"), [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.5), {0, 1}),  # 0.3 + 0.25 >= 0.5: the nucleus is the first two
    (dict(top_p=0.56), {0, 1, 2}),
    (dict(min_p=0.5), {0, 1, 2}),  # p >= 0.15
    # top-p applies to the top-k renormalized: 0.3/0.75 = 0.4, then 0.333, 0.267
    (dict(top_k=3, top_p=0.5), {0, 1}),
    (dict(top_k=3, top_p=0.35), {0}),
    (dict(banned=[0, 1]), {2, 3, 4, 5, 6, 7}),
    # a banned token (EOS under min_tokens) leaves the others' top-k as it is
    (dict(banned=[0, 7], top_k=2), {1, 2}),
    (dict(banned=[5, 7], top_k=1), {0}),
])
def test_filters_never_choose_excluded_tokens(kw, allowed):
    tokens = set(draw(LOGITS, n=2048, **kw).tolist())
    assert tokens == allowed  # every allowed token shows up too, over 2048 draws


def test_sampling_follows_the_distribution():
    tokens = draw(LOGITS, n=4096)
    freq = np.bincount(tokens, minlength=V) / len(tokens)
    np.testing.assert_allclose(freq, PROBS, atol=0.03)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    lg = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (4, V))
    none = jnp.zeros((4, V), bool)
    counts = jnp.zeros((4, V), jnp.int32)

    def run(seeds, index):
        p = inputs(4, seeds=jnp.asarray(seeds, jnp.uint32), output_index=index)
        return [int(t) for t in sample_jit(lg, none, counts, p, num_top=0).tokens]

    sequences = {s: [run([s, 7, 8, 9], i)[0] for i in range(40)] for s in (1, 2)}
    again = [run([1, 3, 3, 3], i)[0] for i in range(40)]  # other rows changed
    assert sequences[1] == again
    assert sequences[1] != sequences[2]


def test_penalties_match_their_definitions():
    logits = jnp.asarray([[2.0, -2.0, 1.0, 0.5]])
    prompt = jnp.asarray([[True, True, False, False]])
    counts = jnp.asarray([[0, 0, 3, 0]], jnp.int32)
    p = SamplingInputs(**{**inputs(1, repetition_penalty=2.0, presence_penalty=0.5,
                                   frequency_penalty=0.25).__dict__})
    got = np.asarray(apply_penalties(logits, prompt, counts, p))[0]
    # seen (prompt or output) -> divided (positive) or multiplied (negative) by 2;
    # generated 3 times -> minus 3 * 0.25 and minus 0.5 once.
    np.testing.assert_allclose(got, [1.0, -4.0, 0.5 - 0.75 - 0.5, 0.5])


def test_logprobs_are_of_the_raw_distribution():
    lg = jnp.asarray([LOGITS], jnp.float32)
    p = inputs(1, temperature=0.0, repetition_penalty=3.0)
    out = sample_jit(lg, jnp.ones((1, V), bool), jnp.zeros((1, V), jnp.int32), p, num_top=3)
    np.testing.assert_allclose(np.asarray(out.top_logprobs[0]), np.log(PROBS[:3]), rtol=1e-5)
    assert np.asarray(out.top_ids[0]).tolist() == [0, 1, 2]
    np.testing.assert_allclose(float(out.logprobs[0]), np.log(PROBS[int(out.tokens[0])]),
                               rtol=1e-5)


def test_logprobs_only_for_the_rows_that_ask():
    """No row asking: zeros, and the same tokens. Rows asking for top logprobs or only the
    chosen token's get the raw distribution's values, whatever the other rows want."""
    lg = jnp.asarray([LOGITS] * 3, jnp.float32)
    none, counts = jnp.zeros((3, V), bool), jnp.zeros((3, V), jnp.int32)
    skipped = sample_jit(lg, none, counts, inputs(3, temperature=0.0, num_logprobs=-1), num_top=3)
    assert np.asarray(skipped.logprobs).tolist() == [0.0] * 3
    assert np.asarray(skipped.top_ids).tolist() == [[0] * 3] * 3
    assert np.asarray(skipped.top_logprobs).tolist() == [[0.0] * 3] * 3
    p = inputs(3, temperature=0.0)
    p = SamplingInputs(**{**p.__dict__, "num_logprobs": jnp.asarray([-1, 0, 2], jnp.int32)})
    mixed = sample_jit(lg, none, counts, p, num_top=3)
    assert np.asarray(mixed.tokens).tolist() == np.asarray(skipped.tokens).tolist() == [0] * 3
    np.testing.assert_allclose(np.asarray(mixed.logprobs)[1:], np.log(PROBS[[0, 0]]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mixed.top_logprobs[2]), np.log(PROBS[:3]), rtol=1e-5)
    assert np.asarray(mixed.top_ids[2]).tolist() == [0, 1, 2]
    # chosen-only rows (0) in the batch: the chosen logprob, and no top-k computed
    p0 = SamplingInputs(**{**p.__dict__, "num_logprobs": jnp.asarray([-1, 0, 0], jnp.int32)})
    only_chosen = sample_jit(lg, none, counts, p0, num_top=3)
    np.testing.assert_allclose(float(only_chosen.logprobs[1]), np.log(PROBS[0]), rtol=1e-5)
    assert np.asarray(only_chosen.top_ids).tolist() == [[0] * 3] * 3


def test_argmax_takes_the_first_of_ties_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (64, 300)).astype(np.float32)  # many ties
    x[3] = -np.inf  # a row with every token banned
    x[4, 7] = x[4, 250] = 9.0
    got = np.asarray(argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32 and got[4] == 7 and got[3] == 0


@pytest.mark.parametrize("values", ["normal", "few distinct", "half -inf"])
@pytest.mark.parametrize("rows, vocab, k", [
    (1, 128256, 20), (3, 60001, 5), (2, 40000, 1),
    (64, 49152, 20),  # blocks of 512 (1024 would leave too few blocks)
    (5, 6000, 20),  # blocks of 64
    (4, 512, 20),  # too few blocks: the whole row is searched
])
def test_top_k_by_blocks_equals_lax_top_k(values, rows, vocab, k):
    """Same values and the same ids as jax.lax.top_k, ties (to the lower id) included, for
    every block size the vocabulary leads to."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    if values == "few distinct":
        x = rng.integers(0, 30, (rows, vocab)).astype(np.float32)
    elif values == "half -inf":
        x[:, ::2] = -np.inf
    want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
    got_values, got_ids = jax.jit(top_k_by_blocks, static_argnums=1)(jnp.asarray(x), k)
    np.testing.assert_array_equal(got_values, want_values)
    np.testing.assert_array_equal(got_ids, want_ids)


def kept_by_sorting(logits: np.ndarray, k: int, p: float) -> np.ndarray:
    """The tokens top-k then top-p keep, from a full sort (numpy, float64 sums)."""
    x = logits.astype(np.float64)
    if 0 < k < x.size:
        x = np.where(x >= np.sort(x)[::-1][k - 1], x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p >= 1:
        return np.isfinite(x)
    ordered = np.sort(probs)[::-1]
    cut = ordered[np.searchsorted(np.cumsum(ordered), p)]
    return probs >= cut


@pytest.mark.parametrize("ks, ps", [([0, 0, 0], [0.9, 0.5, 1.0]),  # no top-k: search skipped
                                     ([1, 7, 0], [1.0, 1.0, 1.0]),  # no top-p: search skipped
                                     ([0, 0, 0], [1.0, 1.0, 1.0])])  # neither
def test_a_search_no_row_asks_for_is_skipped_exactly(ks, ps):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 500)) * 3).astype(np.float32)
    out = _filter_top_k_top_p(jnp.asarray(logits), jnp.asarray(ks, jnp.int32),
                              jnp.asarray(ps, jnp.float32))
    kept = np.isfinite(np.asarray(out))
    for row in range(3):
        want = kept_by_sorting(logits[row], ks[row], ps[row])
        np.testing.assert_array_equal(kept[row], want, err_msg=f"row {row}")
    np.testing.assert_array_equal(np.asarray(out)[kept], logits[kept])


def test_a_far_outlier_does_not_coarsen_top_k():
    """One logit 1e8 below the rest stretched the searched range so far that a 32-step
    search could no longer tell 10, 9.9999 and 9.9998 apart: k=2 kept 3."""
    logits = jnp.asarray([[10.0, 9.9999, 9.9998, -1e8]], jnp.float32)
    out = _filter_top_k_top_p(logits, jnp.asarray([2], jnp.int32), jnp.asarray([1.0]))
    assert np.isfinite(np.asarray(out)).tolist() == [[True, True, False, False]]


def test_top_k_top_p_keep_what_a_full_sort_keeps():
    """The bisected thresholds keep exactly the tokens that numpy's sort keeps."""
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((6, 3000)) * 3).astype(np.float32)
    ks = np.array([0, 1, 5, 50, 0, 2999], np.int32)
    ps = np.array([0.9, 1.0, 0.5, 0.95, 0.3, 1.0], np.float32)
    out = _filter_top_k_top_p(jnp.asarray(logits), jnp.asarray(ks), jnp.asarray(ps))
    kept = np.isfinite(np.asarray(out))
    for row in range(len(ks)):
        want = kept_by_sorting(logits[row], int(ks[row]), float(ps[row]))
        np.testing.assert_array_equal(kept[row], want, err_msg=f"row {row}")


@pytest.mark.parametrize("rows, vocab", [(64, 49152), (64, 512), (128, 128256)])
def test_top_k_by_blocks_sorts_no_row(rows, vocab):
    """The GPU's top_k sorts at most the k chosen block numbers of a row: a sort of the row
    becomes a CUB call on a GPU, which moves the sampler's branch out of XLA's command
    buffer and makes the host wait for the device every step."""
    k = 20
    text = jax.jit(top_k_by_blocks, static_argnums=1).lower(
        jax.ShapeDtypeStruct((rows, vocab), jnp.float32), k).as_text()
    sorted_shapes = re.findall(r'"stablehlo.sort".*?-> tensor<([0-9x]+)x\w+>', text, re.DOTALL)
    assert all(int(shape.split("x")[-1]) <= k for shape in sorted_shapes), sorted_shapes
    assert "chlo.top_k" not in text  # lax.top_k, which a GPU sorts too
