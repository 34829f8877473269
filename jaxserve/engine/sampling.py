"""On-device sampling for a batch of rows, each with its own parameters.

Penalties read two per-slot device tables that the step keeps up to date:
`prompt_mask[slot, vocab]` (token seen in the prompt) and `output_counts[slot, vocab]`
(times generated). Randomness comes only from (request seed, output index), so a seeded
request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    temperature: jax.Array  # [S] f32; 0 = greedy
    top_k: jax.Array  # [S] i32; <= 0 = off
    top_p: jax.Array  # [S] f32
    min_p: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32
    presence_penalty: jax.Array  # [S] f32
    frequency_penalty: jax.Array  # [S] f32
    seeds: jax.Array  # [S] u32
    output_index: jax.Array  # [S] i32: index of the token being sampled within its request
    num_logprobs: jax.Array  # [S] i32: top logprobs the row's request wants (-1: no logprobs)
    banned: jax.Array  # [S, K] i32 token ids that may not be sampled now (-1 = none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    tokens: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, log-probability of the chosen token (raw model distribution)
    top_ids: jax.Array  # [S, N] i32
    top_logprobs: jax.Array  # [S, N] f32
    # The step's output (device_step.py) has a J axis after S (rows sampled per sequence)
    # and the number of proposed tokens accepted per sequence (speculative decoding).
    num_accepted: jax.Array | None = None  # [S] i32


def apply_penalties(logits, prompt_mask, output_counts, p: SamplingInputs):
    """Repetition (HF/vLLM style: prompt and output), presence and frequency penalties."""
    seen = prompt_mask | (output_counts > 0)
    rep = p.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = output_counts.astype(jnp.float32)
    logits = logits - p.frequency_penalty[:, None] * counts
    return logits - p.presence_penalty[:, None] * (counts > 0)


def argmax(x):
    """argmax over the last axis, int32; the first index on ties, as jnp.argmax.

    On CPU XLA's argmax (one reduction of (value, index) pairs) is slow: 8.4 ms for
    [80, 49152] on this project's 2-core machine, against 2.5 ms for a max, then the
    smallest index that holds it. On GPU jnp.argmax is one pass and stays.
    """
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row (never equal to its max): last


BISECTION_STEPS = 32  # threshold resolution: (max - min) / 2**32 of the row's range
# The top-k search starts at most this far below a row's largest logit: a token further
# down has probability exp(-1e4) of the largest's, zero in float32, so leaving it out
# changes no draw, and one far outlier (a huge repetition penalty) cannot coarsen the
# resolution between the top tokens.
TOP_K_SPAN = 1e4


def _bisect(lo, hi, feasible):
    """Largest t in [lo, hi] (per row) with feasible(t), by a fixed number of halvings.

    A Python loop, so no while loop reaches XLA (on GPU a loop's condition is read by the
    host, which would stall the next step's dispatch); and no sort of the vocabulary.
    """
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        ok = feasible(mid)
        lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    return lo


def _filter_top_k_top_p(logits, top_k, top_p):
    """Mask tokens outside the top-k, then outside the top-p nucleus of what is left.

    Thresholds come from bisection: top-k keeps x >= t where t is the largest value with at
    least k tokens >= t; top-p keeps p >= t where t is the largest probability whose tokens
    at or above it hold at least top_p of the mass. Ties at a cut-off are kept. Each search
    is 32 passes over [rows, vocab], so it runs only when some row of the batch asks for it
    (a lax.cond: the device reads the predicate, and the host does not wait for it).
    """
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    target = top_p[:, None]

    def by_top_k(logits):
        hi = logits.max(-1, keepdims=True)
        # from the smallest finite logit: a banned token's -inf would make every midpoint -inf
        lo = jnp.where(jnp.isfinite(logits), logits, hi).min(-1, keepdims=True)
        lo = jnp.maximum(lo, hi - TOP_K_SPAN)
        kth = _bisect(lo, hi, lambda t: (logits >= t).sum(-1, keepdims=True) >= k)
        return jnp.where((logits >= kth) | (k >= vocab), logits, NEG_INF)

    def by_top_p(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        cut = _bisect(jnp.zeros_like(target), probs.max(-1, keepdims=True),
                      lambda t: jnp.where(probs >= t, probs, 0).sum(-1, keepdims=True) >= target)
        return jnp.where((probs >= cut) | (target >= 1), logits, NEG_INF)

    logits = jax.lax.cond(jnp.any(k < vocab), by_top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(target < 1), by_top_p, lambda x: x, logits)


TOP_K_BLOCK = 1024  # the largest block; smaller vocabularies take smaller blocks
_MIN_BLOCK = 64


def top_k(x, k: int):
    """jax.lax.top_k over the last axis of [S, V]: on CPU that one, elsewhere `top_k_by_blocks`
    (on CPU lax.top_k is the faster: 1.5 ms against 5.0 ms at [16, 49152], k = 20)."""
    if jax.default_backend() == "cpu":
        return jax.lax.top_k(x, k)
    return top_k_by_blocks(x, k)


def top_k_by_blocks(x, k: int):
    """jax.lax.top_k over the last axis of [S, V], for a small k, with no sort of the row.

    The vocabulary is cut into blocks: only the k blocks with the largest maxima can hold
    the k largest values, so those k blocks' values are searched instead of the whole row,
    by k argmax passes (`_select_top_k`). Blocks are at most TOP_K_BLOCK tokens, and halved
    until there are more than 4k of them, so the search reads at most a quarter of the row.
    A vocabulary too small for that is searched whole. Ties go to the lower index, as with
    lax.top_k: the chosen blocks stay in index order.

    No path sorts the row: on a GPU XLA sorts a large [S, V] with a CUB radix sort, which
    cannot be captured in XLA's command buffers, so a branch (lax.cond) holding it leaves the
    command buffer and the host waits for the device at every step (1.2 ms a step at
    [64, 49152] on an H200).
    """
    S, V = x.shape
    if k == 0:
        return jax.lax.top_k(x, 0)
    block = TOP_K_BLOCK
    while block > _MIN_BLOCK and -(-V // block) <= 4 * k:
        block //= 2
    blocks = -(-V // block)
    if k > V:
        raise ValueError(f"top_k: k={k} is larger than the last axis ({V})")
    if blocks <= 4 * k:  # a small vocabulary: k passes over the whole row
        where = _select_top_k(x, k)
        return jnp.take_along_axis(x, where, axis=1), where
    padded = jnp.pad(x, ((0, 0), (0, blocks * block - V)), constant_values=NEG_INF)
    padded = padded.reshape(S, blocks, block)
    chosen = jnp.sort(_select_top_k(padded.max(axis=-1), k), axis=-1)  # [S, k], k is small
    candidates = jnp.take_along_axis(padded, chosen[:, :, None], axis=1).reshape(S, -1)
    where = _select_top_k(candidates, k)
    values = jnp.take_along_axis(candidates, where, axis=1)
    picked = jnp.take_along_axis(chosen, where // block, axis=1)
    return values, picked * block + where % block


def _select_top_k(x, k: int):
    """The indices of jax.lax.top_k(x, k) over the last axis of [S, C], by k argmax passes.

    No sort: on a GPU, XLA sorts a large [S, C] with a CUB call, which a branch (lax.cond)
    cannot hold on the device, so the host would wait for it. Values are compared as
    order-preserving int32 keys, and each pick is set to the smallest int32, which no float
    maps to: it is never picked again while a value remains. Ties go to the lower index.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    picks = []
    for _ in range(k):
        pick = argmax(key)
        picks.append(pick)
        key = jnp.where(index == pick[:, None], jnp.iinfo(jnp.int32).min, key)
    return jnp.stack(picks, axis=-1)


def sample(logits, prompt_mask, output_counts, p: SamplingInputs, num_top: int) -> SamplerOutput:
    """logits [S, V] f32 -> one token per row.

    The logprobs are computed only when some row's request asks for them (its chosen
    token's; the top `num_top` when some row wants top logprobs); otherwise they are zeros.
    """
    raw = logits
    # Neutral values are exact no-ops.
    logits = apply_penalties(logits, prompt_mask, output_counts, p)
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = jnp.where(p.banned >= 0, p.banned, logits.shape[-1])  # out of range: dropped
    logits = logits.at[rows, banned].set(NEG_INF, mode="drop")
    greedy = argmax(logits)

    def random_sample(logits):
        scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
        scaled = _filter_top_k_top_p(scaled, p.top_k, p.top_p)
        probs = jax.nn.softmax(scaled, axis=-1)
        max_prob = jnp.max(probs, axis=-1, keepdims=True)
        scaled = jnp.where(probs < p.min_p[:, None] * max_prob, NEG_INF, scaled)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
            p.seeds, p.output_index)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],)))(keys)
        sampled = argmax(scaled + gumbel)
        return jnp.where(p.temperature > 0, sampled, greedy)

    # Each branch below runs only when some row needs it: an all-greedy batch skips the
    # random sampling (its top-k/top-p searches are most of the sampler: 1 ms of a B=128
    # step of the 8B shape on an H200), and a batch that asks for no logprobs skips them.
    # On a GPU each branch is a conditional node of XLA's command buffer: the device reads
    # the predicate and the host does not wait for it. That holds only while every op in
    # both branches can be captured in a command buffer; one that cannot (a CUB sort, see
    # top_k) moves the conditional out, and the host then waits for the device every step.
    tokens = jax.lax.cond(jnp.any(p.temperature > 0), random_sample, lambda _: greedy, logits)
    S = logits.shape[0]
    no_top = (jnp.zeros((S, num_top), jnp.float32), jnp.zeros((S, num_top), jnp.int32))

    def logprobs(raw):
        raw_logprobs = jax.nn.log_softmax(raw, axis=-1)
        chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
        if not num_top:
            return chosen, *no_top
        top_logprobs, top_ids = jax.lax.cond(
            jnp.any(p.num_logprobs > 0), lambda x: tuple(top_k(x, num_top)), lambda _: no_top,
            raw_logprobs)
        return chosen, top_logprobs, top_ids

    chosen, top_logprobs, top_ids = jax.lax.cond(
        jnp.any(p.num_logprobs >= 0), logprobs,
        lambda _: (jnp.zeros((S,), jnp.float32), *no_top), raw)
    return SamplerOutput(tokens, chosen, top_ids, top_logprobs)
