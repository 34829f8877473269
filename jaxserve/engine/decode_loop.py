"""Multi-step decode: K decode steps of a batch in one device call.

A small model's decode step is short on the device, and the host's work around it (building
inputs, dispatching, reading back, detokenizing) sets the step time. When every sequence
decodes, the device can go on by itself: it feeds each step's sampled token into the next,
advances positions and context lengths, and writes K/V to slots it reads from the page
tables. The host then pays once per K tokens.

Each of the K steps is the ordinary step (device_step.py) on inputs derived from the call's
first: a sequence's one token moves to position p + k, samples with output index + k (so a
seeded sample is the one a single step would draw), and counts its input token in the
penalty tables as a single step does. Sequence s runs `num_steps[s]` steps; after its last,
its token writes its K/V to the null page (slot 0) and leaves the penalty tables alone, and
its samples are dropped. The scheduler has allocated the pages for every position written.

Stop tokens, EOS and stop strings are checked on the host as before: tokens sampled after a
stop are discarded, and their K/V lie in pages the finished request gives back.

The call's output has the shape of a speculative step's (step_outputs.py): J = K rows per
sequence, and `num_accepted` = num_steps - 1 extra tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.engine.device_step import DeviceState, StepFn
from jaxserve.engine.step_inputs import StepInputs


def _by_token(row_values: jax.Array, num_tokens: int, fill) -> jax.Array:
    """Per-sequence values [S] as per-token values [T]: in a pure decode batch token t is
    sequence t's only token."""
    S = row_values.shape[0]
    if S >= num_tokens:
        return row_values[:num_tokens]
    return jnp.concatenate([row_values, jnp.full((num_tokens - S,), fill, row_values.dtype)])


def step_inputs(inp: StepInputs, k: jax.Array, page_size: int, num_slots: int) -> StepInputs:
    """Inputs of step k (>= 1) of a multi-step call whose first step has inputs `inp`."""
    T = inp.token_ids.shape[0]
    S = inp.row_slots.shape[0]
    meta = inp.meta
    # A sequence past its last step repeats it (nothing moves out of its pages' range).
    advance = jnp.clip(inp.num_steps - 1, 0, k)  # [S]
    live = k < inp.num_steps  # [S]
    real = meta.positions >= 0  # [T]: tokens of sequences (not padding)
    positions = jnp.where(real, meta.positions + _by_token(advance, T, 0), -1)
    rows = jnp.minimum(jnp.arange(T), S - 1)
    pages = meta.page_tables[rows, jnp.maximum(positions, 0) // page_size]
    writes = real & _by_token(live, T, False)
    slots = jnp.where(writes, pages * page_size + positions % page_size, 0)
    return dataclasses.replace(
        inp,
        prev_index=jnp.where(real, jnp.arange(T), -1),  # sequence t's token from step k - 1
        token_slot=jnp.where(writes, inp.token_slot, num_slots),
        token_is_output=real,
        meta=dataclasses.replace(meta, positions=positions, slot_mapping=slots,
                                 seq_lens=meta.seq_lens + advance),
        reset_slots=jnp.full_like(inp.reset_slots, num_slots),
        sampling=dataclasses.replace(inp.sampling,
                                     output_index=inp.sampling.output_index + advance),
    )


def decode_steps(step: StepFn, steps: int, page_size: int, params, state: DeviceState,
                 inp: StepInputs, recv_tokens):
    """`steps` decode steps -> (state, sampler output [S, steps, ...] with num_accepted
    [S] = num_steps - 1, tokens to send on [S_max]: each sequence's last)."""
    state, first, sent = step(params, state, inp, recv_tokens)

    def one(carry, k):
        state, recv = carry
        state, out, sent = step(params, state, step_inputs(inp, k, page_size, step.num_slots),
                                recv)
        return (state, sent), out

    (state, _), rest = jax.lax.scan(one, (state, sent), jnp.arange(1, steps))
    # first: [S, 1, ...]; rest: [steps - 1, S, 1, ...] -> [S, steps, ...]
    join = lambda a, b: jnp.concatenate([a, jnp.moveaxis(b[:, :, 0], 0, 1)], axis=1)
    extra = jnp.maximum(inp.num_steps - 1, 0)
    out = dataclasses.replace(
        jax.tree.map(join, dataclasses.replace(first, num_accepted=None),
                     dataclasses.replace(rest, num_accepted=None)),
        num_accepted=extra)
    last = jnp.take_along_axis(out.tokens, extra[:, None], axis=1)[:, 0]
    return state, out, jnp.pad(last, (0, step.max_seqs - last.shape[0]))
