"""Scheduling policy: who runs this step, with how many tokens. No device code.

Each step has a token budget. Running requests go first, in priority order (lower value
first, then arrival): a decode takes one token, an unfinished prefill takes the next chunk.
Then waiting requests are admitted, in priority order then arrival, while the budget,
`max_num_seqs` and free pages allow: a request is admitted only when the pages of its
whole prefill are free (they are not reserved: decodes that grow meanwhile may still
preempt it). When a running request needs a
page and none is free, the least important running request is preempted: its pages are
freed and it goes back to the waiting queue, in its place by arrival, to be recomputed from
its prompt and the tokens it already produced (so nothing is lost and greedy output is
unchanged).

Data parallelism: each data shard has its own page table, token budget and `max_num_seqs`.
One waiting queue feeds them all; a request is placed when it is admitted, on the shard
that holds most of its prefix in cache, else the least loaded one, and it stays there until
it finishes or is preempted (a preempted request may be placed anew).

Multi-step decode (`decode_steps` K > 1): while every running request decodes and no
waiting request could be admitted, a decode is scheduled for up to K steps in one device
call (engine/decode_loop.py): its input token and the K - 1 tokens the device samples after
it. Fewer than K where the request reaches max_tokens, or where min_tokens still bans its
stop tokens (the device keeps the bans of the call's first step). Any prefill, or a waiting
request with a free seat, brings back single steps, so arrivals wait at most one call.

Pipeline stages: each step is one tick of a pipeline holding `stages` micro-batches, and a
sequence's sampled token comes out `stages` ticks after it went in. So a sequence that
samples is scheduled again no sooner than that, and each tick takes at most
max_num_seqs / stages sequences per data shard: the running batch splits into one
micro-batch per stage, all in flight at once. Prefill chunks that do not sample follow each
other tick by tick.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from collections.abc import Sequence

from jaxserve.config import SchedulerSection
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import Request, Status


# Not frozen: one is made per sequence and step, and a frozen dataclass's __init__ costs
# about 4x more.
@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start: int  # first position computed this step (== num_computed_tokens before the step)
    num_tokens: int  # tokens computed this step
    samples: bool  # the chunk reaches the end of the known sequence: sample a token
    steps: int = 1  # multi-step decode: decode steps in this call (num_tokens is then 1)


def _rank(req: Request) -> tuple[int, float]:
    """The running list's order: priority (lower first), then arrival."""
    return req.priority, req.arrival_time


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerSection, page_tables: Sequence[PageTable],
                 stages: int = 1):
        self.config = config
        self.page_tables = list(page_tables)  # one per data shard
        self.stages = stages
        self.tick = 0  # steps scheduled so far
        self._per_tick = -(-config.max_num_seqs // stages)  # sequences per shard per tick
        # heap of (priority, arrival, order, req): a preempted request keeps its place
        self._waiting: list[tuple[int, float, int, Request]] = []
        self._order = itertools.count()
        self.running: list[Request] = []
        self._in_order = True  # running is sorted by (priority, arrival)
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        heapq.heappush(self._waiting, (request.priority, request.arrival_time,
                                       next(self._order), request))

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and free its pages."""
        if request in self.running:
            self.running.remove(request)
        else:
            self._waiting = [e for e in self._waiting if e[-1] is not request]
            heapq.heapify(self._waiting)
        self.page_tables[request.shard].free(request.request_id)

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    # ----- the step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.tick += 1
        budgets = [self.config.max_num_batched_tokens] * len(self.page_tables)
        seats = [self._per_tick] * len(self.page_tables)  # sequences each shard may still add
        scheduled: list[ScheduledSeq] = []
        preempted: list[Request] = []
        if not self._in_order:  # only admissions append out of order
            self.running.sort(key=_rank)
            self._in_order = True
        multi = self._decode_steps()

        # One pass over the running requests, most of them decodes: the per-request work of
        # every step, kept to attribute reads and arithmetic.
        tick, running = self.tick, self.running
        i = 0
        while i < len(running):
            req = running[i]
            shard = req.shard
            if req.ready_tick > tick or seats[shard] <= 0 or (
                    req.num_pending
                    and len(req.output_ids) + req.num_pending >= req.params.max_tokens):
                i += 1  # (its last token is on its way: nothing more to compute)
                continue
            if multi == 1 and not req.draft and budgets[shard] > 0 \
                    and req.num_tokens - req.num_computed_tokens == 1:
                n = steps = 1  # a decode: what _chunk and _steps answer, without the calls
            else:
                n = self._chunk(req, budgets[shard])
                steps = self._steps(req, multi) if n else 0
            if steps == 0:  # no budget left on its shard, or its next token (or, in
                i += 1      # multi-step decode, its last) is on its way
                continue
            table = self.page_tables[shard]
            while not table.ensure(req.request_id, req.num_computed_tokens + n + steps - 1):
                victim = next(r for r in reversed(running) if r.shard == shard)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(self._schedule(req, n, steps))
                budgets[shard] -= n
                seats[shard] -= 1
                i += 1

        load = [0] * len(self.page_tables)
        for req in self.running:
            load[req.shard] += 1
        # A multi-step call runs decode attention only: a seat freed by a preemption in it
        # is taken next tick, in single steps.
        full: set[int] = set()  # shards the head of the queue found without pages for it
        while self._waiting and multi == 1:
            req = self._waiting[0][-1]
            if req.num_pending:  # a token from before its preemption is still on the device
                break
            # Penalty tables are rebuilt from the tokens a request computes: no shared prefix.
            use_cache = not req.params.uses_penalties
            shard = self._place(req, budgets, load, seats, use_cache, full)
            if shard is None:
                break
            table = self.page_tables[shard]
            cached = table.admit(req.request_id, req.token_ids, use_cache=use_cache)
            req.num_computed_tokens = cached
            n = self._chunk(req, budgets[shard])
            # Admit only what could finish its prefill with the pages free now: admitted
            # on its first chunk's pages alone, a request preempted itself at its next
            # chunk and (no prefix-cache hit, e.g. with penalties) was admitted again from
            # scratch in the same tick, tick after tick.
            if n == 0 or table.pages_needed(req.request_id, req.num_tokens) \
                    > table.num_free_pages or not table.ensure(req.request_id, cached + n):
                table.free(req.request_id)
                req.num_computed_tokens = 0
                full.add(shard)  # another replica may have the room this one lacks
                continue
            full.clear()
            heapq.heappop(self._waiting)
            req.status = Status.RUNNING
            req.shard = shard
            if req.num_preemptions == 0:
                req.num_cached_tokens = cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            if self.running and _rank(req) < _rank(self.running[-1]):
                self._in_order = False
            self.running.append(req)
            scheduled.append(self._schedule(req, n))
            budgets[shard] -= n
            seats[shard] -= 1
            load[shard] += 1
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _place(self, req: Request, budgets: list[int], load: list[int], seats: list[int],
               use_cache: bool, full: set[int]) -> int | None:
        """The data shard for a request being admitted: of those with token budget and a free
        sequence slot (and not in `full`: tried this tick, without the pages or the budget
        for its chunk), the one caching most of its prefix, then the least loaded."""
        open_shards = [s for s in range(len(self.page_tables)) if budgets[s] > 0
                       and seats[s] > 0 and load[s] < self.config.max_num_seqs
                       and s not in full]
        if len(open_shards) <= 1:
            return open_shards[0] if open_shards else None
        def score(s: int):
            table = self.page_tables[s]
            cached = table.num_cached_tokens(req.token_ids) if use_cache else 0
            return (-cached, load[s], -table.num_free_pages)
        return min(open_shards, key=score)

    def _decode_steps(self) -> int:
        """K (decode_steps) if this step may run several decode steps in one call: every
        running request decodes (one known token to compute, nothing proposed) and no
        waiting request could take a seat. Else 1."""
        k = self.config.decode_steps
        if k == 1 or self.stages > 1:
            return 1
        if self._waiting and any(
                sum(r.shard == s for r in self.running) < self.config.max_num_seqs
                for s in range(len(self.page_tables))):
            return 1
        if any(req.num_tokens - req.num_computed_tokens != 1 or req.draft
               for req in self.running):
            return 1
        return k

    @staticmethod
    def _steps(req: Request, k: int) -> int:
        """Decode steps for a request this call: up to k, no more tokens than max_tokens
        leaves, and no step past the last one that min_tokens still bans stops in."""
        if k == 1:
            return 1
        sampled = len(req.output_ids) + req.num_pending  # its next token's output index
        steps = min(k, req.params.max_tokens - sampled)
        if sampled < req.params.min_tokens:
            steps = min(steps, req.params.min_tokens - sampled)
        return max(steps, 0)

    def _chunk(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        if req.draft:  # speculative decoding: the proposed tokens are computed too
            del req.draft[max(0, budget - remaining):]  # as many as the budget takes
            remaining += len(req.draft)
        # Without chunked prefill a prompt waits for a step with room for all of it; a
        # preempted request's recompute that has outgrown every step is chunked.
        if not self.config.chunked_prefill \
                and budget < remaining <= self.config.max_num_batched_tokens:
            return 0
        return min(remaining, budget)

    def _schedule(self, req: Request, n: int, steps: int = 1) -> ScheduledSeq:
        start = req.num_computed_tokens
        computed = start + n + steps - 1  # multi-step: K/V of the sampled inputs too
        req.num_computed_tokens = computed
        table = self.page_tables[req.shard]
        if table.may_register(req.request_id, computed):  # a page filled: offer it
            table.register(req.request_id, req.token_ids, computed)
        samples = computed >= req.num_tokens  # > with proposed tokens
        req.ready_tick = self.tick + (self.stages if samples else 1)
        return ScheduledSeq(req, start, n, samples, steps)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.draft, req.spec_eligible = [], False
        self.page_tables[req.shard].free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.add(req)
