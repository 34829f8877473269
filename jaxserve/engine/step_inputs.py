"""A step's inputs: written on the host into one packed buffer, unpacked inside the step.

A step takes about twenty small arrays (token ids, positions, page tables, sampling
parameters). Sent one by one, each costs a host-to-device transfer per device, which shows
in every decode step. So the host writes them into one int32 buffer per block (data shard,
pipeline stage): its int32 fields first, then its float32 fields, whose bits it holds. Named
numpy views read like separate arrays, and the jitted step slices them apart again
(`Layout.unpack`). The bucket fixes every shape, so the slices are static.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.sampling import SamplingInputs
from jaxserve.models.llama import AttentionMetadata


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One data shard's inputs, as the jitted step sees them."""

    token_ids: jax.Array  # [T] host-known input tokens
    prev_index: jax.Array  # [T] row of the previous step's tokens to use instead (-1: none)
    token_slot: jax.Array  # [T] penalty-table slot of the token's request (R: padding)
    token_is_output: jax.Array  # [T] bool: position >= prompt length (counts for penalties)
    meta: AttentionMetadata
    logits_indices: jax.Array  # [S, J] tokens sampled in each sequence: its last, or with
    # J > 1 (speculative decoding) its last known token and each proposed one after it
    num_draft: jax.Array  # [S] proposed tokens at the end of each sequence's chunk
    num_steps: jax.Array  # [S] multi-step decode: decode steps of each sequence (padding: 0)
    row_slots: jax.Array  # [S] penalty-table slot of each sequence (R: padding)
    reset_slots: jax.Array  # [S] slots whose tables restart this step (R: none)
    sampling: SamplingInputs


# Field name -> (buffer, shape in terms of T, S, P (pages per sequence), K (banned ids),
# J (rows sampled per sequence: 1, or 1 + speculative.num_tokens)).
# "i": int32 buffer; "f": float32 buffer; "b": bool kept as int32; "u": uint32 kept as int32.
_FIELDS = (
    ("token_ids", "i", "T"), ("prev_index", "i", "T"), ("token_slot", "i", "T"),
    ("token_is_output", "b", "T"), ("positions", "i", "T"), ("slot_mapping", "i", "T"),
    ("page_tables", "i", "SP"), ("seq_lens", "i", "S"), ("query_start", "i", "S+1"),
    ("logits_indices", "i", "SJ"), ("num_draft", "i", "S"), ("num_steps", "i", "S"),
    ("row_slots", "i", "S"),
    ("reset_slots", "i", "S"),
    ("temperature", "f", "S"), ("top_k", "i", "S"), ("top_p", "f", "S"), ("min_p", "f", "S"),
    ("repetition_penalty", "f", "S"), ("presence_penalty", "f", "S"),
    ("frequency_penalty", "f", "S"), ("seeds", "u", "S"), ("output_index", "i", "S"),
    ("num_logprobs", "i", "S"),
    ("banned", "i", "SK"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each field sits in a block's buffer (int32 fields, then float32 ones), for one
    (T, S, J) bucket."""

    T: int  # padded tokens
    S: int  # padded sequences
    P: int  # pages per sequence
    K: int  # banned token ids per sequence
    J: int = 1  # rows sampled per sequence
    # The program that reads it (the buffer is the same): a general step (0; prefill chunks,
    # decodes and verifications together), or a decode-only program of `steps` decode steps
    # (every sequence one query token a step, J = 1), one or several (multi-step decode).
    steps: int = 0

    def shape(self, dims: str) -> tuple[int, ...]:
        return {"T": (self.T,), "S": (self.S,), "S+1": (self.S + 1,), "SP": (self.S, self.P),
                "SK": (self.S, self.K), "SJ": (self.S, self.J)}[dims]

    @functools.cached_property
    def _table(self):
        slots, ends = {}, {False: 0, True: 0}
        for name, kind, dims in _FIELDS:
            shape = self.shape(dims)
            is_float = kind == "f"
            start = ends[is_float]
            ends[is_float] = start + int(np.prod(shape))
            slots[name] = (is_float, start, ends[is_float], shape)
        return slots, ends[False], ends[True]

    @property
    def slots(self) -> dict[str, tuple[bool, int, int, tuple[int, ...]]]:
        """name -> (in the float buffer, start, stop, shape)."""
        return self._table[0]

    @property
    def num_ints(self) -> int:
        return self._table[1]

    @property
    def num_floats(self) -> int:
        return self._table[2]

    @property
    def size(self) -> int:
        """int32 values in one block's buffer: the int fields, then the floats' bits."""
        return self.num_ints + self.num_floats

    def unpack(self, buffer: jax.Array) -> StepInputs:
        """One block's buffer [size] int32 -> StepInputs."""
        kinds = {name: kind for name, kind, _ in _FIELDS}
        ints = buffer[:self.num_ints]
        floats = jax.lax.bitcast_convert_type(buffer[self.num_ints:], jnp.float32)

        def get(name):
            is_float, start, stop, shape = self.slots[name]
            x = (floats if is_float else ints)[start:stop].reshape(shape)
            if kinds[name] == "b":
                return x != 0
            if kinds[name] == "u":
                return jax.lax.bitcast_convert_type(x, jnp.uint32)
            return x

        meta = AttentionMetadata(*(get(n) for n in ("positions", "slot_mapping", "page_tables",
                                                      "seq_lens", "query_start")))
        sampling = SamplingInputs(*(get(f.name) for f in dataclasses.fields(SamplingInputs)))
        return StepInputs(get("token_ids"), get("prev_index"), get("token_slot"),
                          get("token_is_output"), meta, get("logits_indices"),
                          get("num_draft"), get("num_steps"), get("row_slots"),
                          get("reset_slots"), sampling)


class HostInputs:
    """Padded inputs of every (data shard, pipeline stage) block of one step: buffer
    [D, P, layout.size] int32 (the float32 fields as their bits);
    `blocks[d][p]` names one block's views."""

    def __init__(self, layout: Layout, num_shards: int, num_slots: int, num_stages: int = 1):
        self.layout = layout
        self.buffer = np.zeros((num_shards, num_stages, layout.size), np.int32)
        ints = self.buffer[..., :layout.num_ints]
        floats = self.buffer[..., layout.num_ints:].view(np.float32)
        self.blocks = [[ShardInputs(ints[d, p], floats[d, p], layout, num_slots)
                        for p in range(num_stages)] for d in range(num_shards)]


class ShardInputs:
    """Named views of one block of the buffers (token_ids, page_tables, ...)."""

    def __init__(self, ints: np.ndarray, floats: np.ndarray, layout: Layout, num_slots: int):
        for name, kind, _ in _FIELDS:
            is_float, start, stop, shape = layout.slots[name]
            view = (floats if is_float else ints)[start:stop].reshape(shape)
            setattr(self, name, view.view(np.uint32) if kind == "u" else view)
        # Padding: no previous token, no slot, position -1 (the null page takes its K/V),
        # neutral sampling parameters, no logprobs, nothing banned.
        self.prev_index[:] = -1
        self.token_slot[:] = num_slots
        self.positions[:] = -1
        self.row_slots[:] = num_slots
        self.reset_slots[:] = num_slots
        self.top_p[:] = 1
        self.repetition_penalty[:] = 1
        self.num_logprobs[:] = -1
        self.banned[:] = -1

    def copy_into(self, dst: ShardInputs) -> None:
        """Write this block into `dst`, a block of a bucket at least as large."""
        for name, _, _ in _FIELDS:
            src = getattr(self, name)
            getattr(dst, name)[tuple(slice(0, n) for n in src.shape)] = src
        dst.query_start[len(self.query_start):] = self.query_start[-1]
