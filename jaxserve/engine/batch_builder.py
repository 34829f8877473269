"""From the scheduler's choice to a step's host inputs: buckets, penalty slots, buffers.

The runner asks for one micro-batch per step (`micro_batch`): the scheduled sequences of
each data shard, padded to the smallest (tokens, sequences) bucket that holds them, written
into the packed buffers of step_inputs.py. With pipeline stages, `tick_inputs` stacks the
micro-batches in flight, one per stage, into one step's inputs. Each request holds a
penalty-table slot in its data shard from its first step until it finishes or is preempted.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools

import numpy as np

from jaxserve.config import Config
from jaxserve.engine.page_table import PageTable, cache_slots
from jaxserve.engine.request import MAX_STOP_TOKEN_IDS, Request
from jaxserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from jaxserve.engine.step_inputs import HostInputs, Layout, ShardInputs


@dataclasses.dataclass
class MicroBatch:
    """The inputs of one micro-batch, in its own bucket, while it moves down the stages."""

    host: HostInputs  # [D, 1, ...]
    rows: list[tuple[Request, int, int]]  # the tokens it will sample


# The step inputs filled from each request's SamplingParams, in the order _fill gathers them.
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seeds", "num_logprobs")


@dataclasses.dataclass
class _ShardRows:
    """What one data shard's last micro-batch wrote that stays the same while its sequences
    do (the same requests in the same rows, as in most decode steps): kept so the next
    micro-batch copies it instead of gathering it again from every request."""

    reqs: list[Request]
    slots: np.ndarray  # [S] penalty-table slots
    fixed: np.ndarray  # [S, 10] the _SAMPLING_FIELDS, then min_tokens (float64)
    pages: list[np.ndarray]  # each row's page array, as PageTable.row gave it
    tables: np.ndarray  # the page_tables block it wrote [S_bucket, P]


class _Ring:
    """HostInputs of one layout, handed out in turn and reset to padding (a copy of a
    template buffer) instead of made anew each step. A buffer comes round again after
    `depth` others: the engine keeps one step in flight, and a pipeline's micro-batches are
    read for `stages` ticks, so with depth stages + 2 no step can still be reading it."""

    def __init__(self, make, depth: int):
        self._make = make
        self._items: list[HostInputs] = []
        self._template = make().buffer
        self._depth = depth
        self._next = 0

    def take(self) -> HostInputs:
        if len(self._items) < self._depth:
            self._items.append(self._make())
            return self._items[-1]
        host = self._items[self._next]
        self._next = (self._next + 1) % self._depth
        np.copyto(host.buffer, self._template)
        return host


class BatchBuilder:
    def __init__(self, config: Config, num_shards: int, stages: int, eos_ids,
                 decode_programs: bool = False):
        self.config = config
        # Steps whose sequences each compute one token run decode-only programs
        # (runner.decode_programs, resolved by the runner).
        self.decode_programs = decode_programs
        self.num_shards = num_shards
        self.stages = stages
        self.num_slots = config.scheduler.max_num_seqs  # penalty slots per data shard
        self.page_size = config.cache.page_size
        self.pages_per_seq = -(-config.cache.max_model_len // self.page_size)
        self.eos_ids = tuple(eos_ids)
        self.num_banned = MAX_STOP_TOKEN_IDS + len(self.eos_ids)
        self._free_slots = [list(range(self.num_slots)) for _ in range(num_shards)]
        self._slot_of: dict[str, tuple[int, int]] = {}  # request id -> (data shard, slot)
        self._last: list[_ShardRows | None] = [None] * num_shards
        self._rings: dict[tuple[Layout, int], _Ring] = {}

    def host_inputs(self, layout: Layout, stages: int = 1) -> HostInputs:
        """Padded inputs for one step of this layout (every block padding)."""
        ring = self._rings.get((layout, stages))
        if ring is None:
            ring = self._rings[layout, stages] = _Ring(
                lambda: HostInputs(layout, self.num_shards, self.num_slots, stages),
                self.stages + 2)
        return ring.take()

    @functools.cache  # noqa: B019 -- a handful of buckets, for the builder's lifetime
    def layout(self, num_tokens: int, num_seqs: int, rows: int = 1, steps: int = 0) -> Layout:
        return Layout(num_tokens, num_seqs, self.pages_per_seq, self.num_banned, rows, steps)

    def bucket(self, buckets, n: int, what: str) -> int:
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}")
        return buckets[i]

    def slot(self, req: Request) -> tuple[int, bool]:
        """The request's penalty-table slot in its shard, and whether it was just assigned."""
        held = self._slot_of.get(req.request_id)  # released when a request is preempted
        if held is not None:
            return held[1], False
        self._slot_of[req.request_id] = (req.shard, self._free_slots[req.shard].pop())
        return self._slot_of[req.request_id][1], True

    def micro_batch(self, sched: SchedulerOutput, page_tables: list[PageTable],
                    prev_rows: list[tuple[Request, int, int]]) -> MicroBatch:
        """The scheduled sequences' inputs, padded to their own bucket."""
        if self.num_shards == 1:
            by_shard: list[list[ScheduledSeq]] = [list(sched.seqs)]
        else:
            by_shard = [[] for _ in range(self.num_shards)]
            for seq in sched.seqs:
                by_shard[seq.request.shard].append(seq)
        n_tok = max(sum([s.num_tokens for s in seqs]) for seqs in by_shard)
        n_seq = max(len(seqs) for seqs in by_shard)
        T = self.bucket(self.config.runner.token_buckets, n_tok, "tokens")
        S = self.bucket(self.config.runner.seq_buckets, n_seq, "sequences")
        # Rows sampled per sequence: 1, or 1 + k when a sequence verifies proposed tokens
        # (speculative decoding): two programs per bucket, so plain steps stay plain.
        J = self.config.speculative.rows if any(s.request.draft for s in sched.seqs) else 1
        # The program (Layout.steps): multi-step decode's of decode_steps steps, if any
        # sequence takes more than one (the others stop early inside it); a decode-only
        # step's if every sequence computes one token (a decode, or a prompt's one-token
        # chunk, which attends as a decode does); else the general step.
        if any(s.steps > 1 for s in sched.seqs):
            K = self.config.scheduler.decode_steps
        elif self.decode_programs and J == 1 and all(s.num_tokens == 1 for s in sched.seqs):
            K = 1
        else:
            K = 0
        prev_row = {req: row for req, _, row in prev_rows}  # requests hash by identity
        rows: list[tuple[Request, int, int]] = []
        host = self.host_inputs(self.layout(T, S, J, K))
        for shard, seqs in enumerate(by_shard):
            self._fill(host.blocks[shard][0], seqs, page_tables[shard], prev_row, shard,
                       plain=J == 1 and K <= 1)
            rows += [(seq.request, shard, row) for row, seq in enumerate(seqs) if seq.samples]
        return MicroBatch(host, rows)

    def tick_inputs(self, ring: list[MicroBatch]) -> tuple[tuple[int, int, int, int],
                                                           HostInputs]:
        """Inputs of one step: stage s gets ring[s], all in the largest bucket among them.
        The bucket is (tokens, sequences, rows sampled per sequence, decode steps of a
        decode-only program or 0: Layout.steps)."""
        T = max(mb.host.layout.T for mb in ring)
        S = max(mb.host.layout.S for mb in ring)
        if self.stages == 1:
            host = ring[0].host
            return (T, S, host.layout.J, host.layout.steps), host
        else:
            host = self.host_inputs(self.layout(T, S), self.stages)
            for stage, mb in enumerate(ring):
                for shard in range(self.num_shards):
                    mb.host.blocks[shard][0].copy_into(host.blocks[shard][stage])
        return (T, S, 1, 0), host

    def _fill(self, host: ShardInputs, seqs: list[ScheduledSeq], page_table: PageTable,
              prev_row: dict[Request, int], shard: int, plain: bool) -> None:
        """One data shard's sequences into its padded buffers: one pass over the sequences
        gathers their numbers, then whole-array writes place them (per-token work is numpy;
        a page table is one array copy, whatever the context). What does not change while
        the shard runs the same requests in the same rows (penalty slots, sampling
        parameters, page tables that did not grow) is copied from its last micro-batch.
        plain: no sequence verifies proposed tokens or runs several decode steps."""
        S = len(seqs)
        if S == 0:
            self._last[shard] = None
            return  # all padding: query_start stays 0
        reqs = [seq.request for seq in seqs]
        last = self._last[shard]
        if last is None or last.reqs != reqs or last.tables.shape != host.page_tables.shape:
            last = None
            held = [self.slot(req) for req in reqs]
            slots = np.array([slot for slot, _ in held], np.int64)
            fresh = np.array([new for _, new in held], bool)
            # float64 holds each of these ints exactly
            fixed = np.array([(p.temperature, p.top_k, p.top_p, p.min_p,
                               p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                               req.seed, -1 if p.logprobs is None else p.logprobs,
                               p.min_tokens) for req in reqs for p in (req.params,)],
                             np.float64)
        else:
            slots, fresh, fixed = last.slots, None, last.fixed
        # Prompt lengths are read every step: a draft model's shadow request
        # (engine/draft.py) is rebuilt with a new prompt in the same row.
        # (np.fromiter over the flattened tuples: a quarter less than np.array on them)
        if plain:  # no proposal, one step each: two numbers fewer to gather per sequence
            nums = np.fromiter(itertools.chain.from_iterable([
                (seq.start, seq.num_tokens, len(req.prompt_ids), len(req.output_ids),
                 req.num_pending) for seq, req in zip(seqs, reqs, strict=True)]),
                np.int64, 5 * S)
            starts, counts, prompt_lens, num_out, pending = nums.reshape(S, 5).T
            drafts, steps = np.zeros(S, np.int64), np.ones(S, np.int64)
        else:
            nums = np.fromiter(itertools.chain.from_iterable([
                (seq.start, seq.num_tokens, len(req.prompt_ids), len(req.output_ids),
                 req.num_pending, len(req.draft), seq.steps)
                for seq, req in zip(seqs, reqs, strict=True)]), np.int64, 7 * S)
            starts, counts, prompt_lens, num_out, pending, drafts, steps = nums.reshape(S, 7).T
        ends = np.cumsum(counts)
        firsts, total = ends - counts, int(ends[-1])
        row_of = np.repeat(np.arange(S), counts)  # each token's sequence
        positions = np.arange(total) - np.repeat(firsts - starts, counts)
        # inputs the host knows (np.clip's own overhead is several times this on 64 rows)
        known = np.minimum(np.maximum(prompt_lens + num_out - starts, 0), counts)

        # Page tables: rows whose pages did not change since the last micro-batch are copied
        # with it in one block.
        tables = host.page_tables
        pages = page_table.rows([req.request_id for req in reqs])
        if last is None:
            changed = range(S)
        else:
            tables[:] = last.tables
            changed = [row for row, (now, before) in enumerate(zip(pages, last.pages, strict=True))
                       if now is not before]
        for row in changed:
            tables[row] = 0
            tables[row, :len(pages[row])] = pages[row]
        for row in np.flatnonzero(known if plain else known | drafts).tolist():
            req, q, k, start = reqs[row], int(firsts[row]), int(known[row]), int(starts[row])
            if k:
                host.token_ids[q:q + k] = req.token_ids[start:start + k]
            if req.draft:  # speculative decoding: the proposed tokens follow the known ones
                host.token_ids[q + k:q + int(counts[row])] = req.draft
        self._last[shard] = _ShardRows(reqs, slots, fixed, pages, tables)
        # Inputs sampled by the previous step, still on the device (no proposal in the way).
        missing = counts - known if plain else np.where(drafts == 0, counts - known, 0)
        if missing.any():
            idx = np.flatnonzero(missing)
            m = missing[idx]
            from_row = [prev_row[reqs[i]] for i in idx.tolist()]
            first = firsts[idx] + known[idx]  # the first input each of them misses
            if len(idx) == int(m.sum()):  # one each (decodes): no runs to spread
                host.prev_index[first] = from_row
            else:
                first = np.repeat(first - (np.cumsum(m) - m), m)
                host.prev_index[first + np.arange(int(m.sum()))] = np.repeat(from_row, m)
        ps = self.page_size
        host.positions[:total] = positions
        host.slot_mapping[:total] = cache_slots(tables[row_of, positions // ps], positions, ps)
        host.token_slot[:total] = slots[row_of]
        host.token_is_output[:total] = positions >= prompt_lens[row_of]
        host.seq_lens[:S] = starts + counts
        host.query_start[1:S + 1] = ends
        host.query_start[S + 1:] = total
        host.num_draft[:S] = drafts
        host.num_steps[:S] = steps
        J = host.logits_indices.shape[1]
        host.logits_indices[:S] = (ends - 1 - drafts)[:, None] + np.minimum(
            np.arange(J)[None, :], drafts[:, None])
        if drafts.any():  # proposed tokens are not the request's yet: no penalty counts
            is_draft = np.arange(total) > np.repeat(ends - 1 - drafts, counts)
            host.token_slot[:total][is_draft] = self.num_slots
        host.row_slots[:S] = slots
        if fresh is not None:
            host.reset_slots[:S][fresh] = slots[fresh]

        # Sampling parameters: temperature, top_k, top_p, min_p, the three penalties, seed,
        # logprobs; then min_tokens.
        for column, name in zip(fixed[:, :-1].T, _SAMPLING_FIELDS, strict=True):
            getattr(host, name)[:S] = column
        min_tokens = fixed[:, -1]
        out_index = num_out + pending  # the output index of each sequence's next token
        host.output_index[:S] = out_index
        for row in np.flatnonzero(out_index < min_tokens).tolist():
            p = reqs[row].params  # what would stop it is banned until min_tokens (with
            # ignore_eos an EOS stops nothing: an ordinary token)
            banned = [*p.stop_token_ids, *(() if p.ignore_eos else self.eos_ids)]
            host.banned[row, :len(banned)] = banned

    def release(self, request_id: str) -> None:
        """Give back a finished or preempted request's penalty slot."""
        self._last = [None] * self.num_shards  # a slot may be handed out again
        held = self._slot_of.pop(request_id, None)
        if held is not None:
            shard, slot = held
            self._free_slots[shard].append(slot)

