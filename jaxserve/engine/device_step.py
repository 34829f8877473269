"""What one device does in one step: its data shard's micro-batch at its pipeline stage.

Every device runs this under `jax.shard_map` (see runner.py) with local shapes: its data
shard's pages and penalty slots, its tensor rank's heads and its stage's layer slots.

Without pipeline stages a step is: input tokens (host-known, or sampled by the previous step
and still on the device) -> penalty-table updates -> embedding -> every layer -> logits ->
sampling.

With P stages the step is one tick of a pipeline that holds P micro-batches: stage s runs
its layers on the micro-batch that entered s ticks ago. Stage 0 embeds the new micro-batch's
tokens; every other stage takes the activations that stage s-1 produced at the previous tick
(`pipe_x`). After its layers each stage sends its activations, and its sampled tokens, to the
next stage around the ring (`ppermute`), so stage 0 receives the tokens the last stage just
sampled: a decode's input token never goes through the host. Every stage computes logits and
samples, and only the last stage's are used: that keeps one SPMD program with no branch on
the stage, at the cost of the LM head and sampling on every stage. The penalty tables that
matter are the last stage's: it updates them from its micro-batch's inputs, resolving the
tokens that stage 0 took from the device with its own history of sampled tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.engine.sampling import sample
from jaxserve.engine.step_inputs import StepInputs
from jaxserve.models.llama import LlamaModel

PIPELINE_AXIS = "pipeline"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """Global arrays; the block one device holds is shown after the |."""

    k_pages: jax.Array  # [P * slots | slots, D * N | N, page_size, KVH | KVH / tp, head_dim]
    v_pages: jax.Array  # same as k_pages
    prompt_mask: jax.Array  # [D * R | R, V] bool
    output_counts: jax.Array  # [D * R | R, V] int32
    pipe_x: jax.Array | None = None  # [D, P, T_max, E | 1, 1, T_max, E]; P > 1 only
    history: jax.Array | None = None  # [D, P, P, S_max | 1, 1, P, S_max]; P > 1 only
    # int8/fp8 pages (cache.kv_dtype): (k_scales, v_scales), each k_pages' shape less head_dim
    kv_scales: tuple[jax.Array, jax.Array] | None = None

    @property
    def kv(self) -> tuple:
        """What the model's layers carry: (k_pages, v_pages[, k_scales, v_scales])."""
        return (self.k_pages, self.v_pages, *(self.kv_scales or ()))


@dataclasses.dataclass(frozen=True)
class StepFn:
    model: LlamaModel  # one device's shapes
    stages: int
    num_slots: int  # penalty slots per data shard (R)
    max_seqs: int  # S_max
    num_top: int

    def __call__(self, params, state: DeviceState, inp: StepInputs, recv_tokens):
        """(params, local state, this block's inputs, tokens received [S_max]) ->
        (state, sampler output [S], tokens to send on [S_max])."""
        P = self.stages
        if P == 1:
            source = recv_tokens
        else:  # stage 0: what the last stage just sampled; last stage: its own, P ticks ago
            stage = jax.lax.axis_index(PIPELINE_AXIS)
            source = jnp.where(stage == 0, recv_tokens, state.history[0, 0, P - 1])
        tokens = jnp.where(inp.prev_index >= 0, source[jnp.maximum(inp.prev_index, 0)],
                           inp.token_ids)
        prompt_mask, counts = self._update_tables(state, inp, tokens)
        variables = {"params": params}
        x = self.model.apply(variables, tokens, method=LlamaModel.embed)
        if P > 1:
            carried = state.pipe_x[0, 0, :x.shape[0]]
            x = jnp.where(stage == 0, x, carried)
        x, (k_pages, v_pages, *kv_scales) = self.model.apply(
            variables, x, state.kv, inp.meta, method=LlamaModel.decode)
        kv_scales = tuple(kv_scales) or None
        out = self._sample(variables, x, tokens, inp, prompt_mask, counts)
        last = jnp.take_along_axis(out.tokens, out.num_accepted[:, None], axis=1)[:, 0]
        sampled = jnp.pad(last, (0, self.max_seqs - last.shape[0]))
        if P == 1:
            return DeviceState(k_pages, v_pages, prompt_mask, counts,
                               kv_scales=kv_scales), out, sampled
        ring = [(i, (i + 1) % P) for i in range(P)]
        pipe_x = state.pipe_x.at[0, 0, :x.shape[0]].set(
            jax.lax.ppermute(x, PIPELINE_AXIS, ring))
        history = jnp.concatenate([sampled[None], state.history[0, 0, :-1]])[None, None]
        state = DeviceState(k_pages, v_pages, prompt_mask, counts, pipe_x, history, kv_scales)
        return state, out, jax.lax.ppermute(sampled, PIPELINE_AXIS, ring)

    def _sample(self, variables, x, tokens, inp: StepInputs, prompt_mask, counts):
        """Sample J rows per sequence -> SamplerOutput [S, J, ...] and num_accepted [S].

        With J > 1 (speculative decoding) row j samples the position of the j-th proposed
        token, with output index + j, so each row draws what it would draw without
        speculation; proposal j + 1 is accepted while every row up to j sampled exactly
        the proposal after it (engine/speculative.py says why that rule is exact)."""
        S, J = inp.logits_indices.shape
        logits = self.model.apply(variables, x, inp.logits_indices.reshape(S * J),
                                  method=LlamaModel.logits)
        rows = jnp.minimum(inp.row_slots, self.num_slots - 1)
        params = inp.sampling
        if J > 1:
            params = jax.tree.map(lambda a: jnp.repeat(a, J, axis=0), params)
            params = dataclasses.replace(
                params, output_index=params.output_index + jnp.tile(jnp.arange(J), S))
            rows = jnp.repeat(rows, J)
        out = sample(logits, prompt_mask[rows], counts[rows], params, self.num_top)
        out = jax.tree.map(lambda a: a.reshape(S, J, *a.shape[1:]), out)
        if J > 1:
            proposed = tokens[inp.logits_indices[:, 1:]]  # [S, J - 1]
            live = jnp.arange(J - 1)[None, :] < inp.num_draft[:, None]
            match = (out.tokens[:, :-1] == proposed) & live
            accepted = jnp.cumprod(match.astype(jnp.int32), axis=1).sum(axis=1)
        else:
            accepted = jnp.zeros((S,), jnp.int32)
        return dataclasses.replace(out, num_accepted=accepted)

    def _update_tables(self, state: DeviceState, inp: StepInputs, tokens):
        """Reset new requests' slots, then mark prompt tokens seen and count output tokens."""
        r = self.num_slots  # an out-of-range slot: the write is dropped
        prompt_mask = state.prompt_mask.at[inp.reset_slots].set(False, mode="drop")
        counts = state.output_counts.at[inp.reset_slots].set(0, mode="drop")
        prompt_mask = prompt_mask.at[jnp.where(inp.token_is_output, r, inp.token_slot),
                                     tokens].set(True, mode="drop")
        counts = counts.at[jnp.where(inp.token_is_output, inp.token_slot, r),
                           tokens].add(1, mode="drop")
        return prompt_mask, counts
