"""Scheduling policy on the host alone: a simulated device appends one token per sampled
sequence, so budgets, chunking, admission, preemption and recompute can be checked exactly."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.config import SchedulerSection
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import Request, SamplingParams, Status
from jaxserve.engine.scheduler import Scheduler, SchedulerOutput

_ids = itertools.count()


def make_request(prompt_len: int, max_tokens: int, priority: int = 0, t: float = 0.0):
    return Request(f"r{next(_ids)}", list(range(1, prompt_len + 1)),
                   SamplingParams(max_tokens=max_tokens), seed=0,
                   arrival_time=t, priority=priority)


def next_token(req: Request) -> int:
    """The simulated model: a token that depends only on the sequence so far."""
    return (sum(req.all_token_ids) * 31 + len(req.all_token_ids)) % 1000


def run_step(sched: Scheduler, log: list | None = None):
    out = sched.schedule()
    for s in out.seqs:
        req = s.request
        assert s.start + s.num_tokens == req.num_computed_tokens
        if s.samples:
            req.output_ids.append(next_token(req))
            if len(req.output_ids) >= req.params.max_tokens:
                req.status = Status.FINISHED
                sched.remove(req)
    if log is not None:
        log.append(out)
    return out


def test_chunked_prefill_runs_beside_decodes():
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=4, max_num_batched_tokens=16), [pt])
    short = make_request(3, max_tokens=10)
    sched.add(short)
    run_step(sched)  # short's prefill
    long = make_request(40, max_tokens=2, t=1.0)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 40:
        out = run_step(sched)
        by_req = {s.request.request_id: s for s in out.seqs}
        assert by_req[short.request_id].num_tokens == 1  # the decode is never starved
        chunks.append(by_req[long.request_id].num_tokens)
        assert out.num_tokens <= 16
    assert chunks == [15, 15, 10]


def test_a_data_shard_without_pages_sends_the_queue_to_another():
    """The shard caching most of a prompt may lack the pages for the rest of it: the
    request goes to another replica instead of holding up the queue behind it."""
    tables = [PageTable(num_pages=5, page_size=4) for _ in range(2)]  # 4 pages each
    sched = Scheduler(SchedulerSection(max_num_seqs=4, max_num_batched_tokens=64), tables)
    a = make_request(13, max_tokens=3)
    sched.add(a)
    run_step(sched)
    assert a.shard == 0 and tables[0].num_free_pages == 0  # a's 4 pages, 3 of them cached
    b = Request("b", a.prompt_ids[:8] + [90, 91, 92], SamplingParams(max_tokens=2), seed=0,
                arrival_time=1.0)  # 8 tokens cached on shard 0, which has no page for more
    c = make_request(3, max_tokens=2, t=2.0)
    sched.add(b)
    sched.add(c)
    out = run_step(sched)
    assert {s.request.request_id for s in out.seqs} == {a.request_id, "b", c.request_id}
    assert (b.shard, c.shard) == (1, 1) and sched.num_waiting == 0
    for t in tables:
        t.check_integrity()


def test_max_num_seqs_bounds_the_running_set():
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=2, max_num_batched_tokens=64), [pt])
    reqs = [make_request(3, 5, t=i) for i in range(5)]
    for r in reqs:
        sched.add(r)
    out = run_step(sched)
    assert [s.request for s in out.seqs] == reqs[:2]
    assert sched.num_waiting == 3


def test_priority_orders_admission():
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=1, max_num_batched_tokens=64), [pt])
    low, high = make_request(3, 5, priority=5, t=0), make_request(3, 5, priority=-1, t=1)
    sched.add(low)
    sched.add(high)
    assert run_step(sched).seqs[0].request is high


def test_running_requests_go_in_priority_order_after_a_later_admission():
    """A more important request admitted after a running one is scheduled before it from
    the next step on (the running list is re-sorted only when an admission breaks its
    order)."""
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=3, max_num_batched_tokens=64), [pt])
    low, high = make_request(3, 20, priority=5, t=0), make_request(3, 20, priority=0, t=1)
    sched.add(low)
    run_step(sched)
    sched.add(high)
    assert [s.request for s in run_step(sched).seqs] == [low, high]  # admitted after it
    for _ in range(3):
        assert [s.request for s in run_step(sched).seqs] == [high, low]
    late = make_request(3, 20, priority=9, t=2)  # least important: order kept, no sort
    sched.add(late)
    run_step(sched)
    assert [s.request for s in run_step(sched).seqs] == [high, low, late]


def test_preemption_recomputes_and_loses_nothing():
    # 9 usable pages of 2 tokens: two requests of 6 + 8 tokens cannot both finish.
    pt = PageTable(num_pages=10, page_size=2)
    sched = Scheduler(SchedulerSection(max_num_seqs=4, max_num_batched_tokens=32), [pt])
    first, second = make_request(6, 8, t=0), make_request(6, 8, t=1)
    alone = make_request(6, 8, t=2)
    sched.add(first)
    sched.add(second)
    preempted = []
    while sched.has_work():
        preempted += run_step(sched).preempted
        pt.check_integrity()
    assert preempted and all(r is second for r in preempted)  # the later arrival yields
    assert second.num_preemptions >= 1
    other = Scheduler(SchedulerSection(max_num_seqs=4, max_num_batched_tokens=32),
                      [PageTable(num_pages=64, page_size=2)])
    other.add(alone)
    while other.has_work():
        run_step(other)
    assert first.output_ids == alone.output_ids == second.output_ids
    assert pt.num_used_pages == 0


def test_without_chunked_prefill_a_recompute_longer_than_a_step_is_chunked():
    """chunked_prefill: false keeps each prompt whole, but a preempted request's recompute
    (prompt and the tokens it produced) may have outgrown one step's budget: it is chunked,
    instead of waiting forever at the head of the queue."""
    pt = PageTable(num_pages=10, page_size=2, enable_prefix_cache=False)  # no shared prompt
    config = SchedulerSection(max_num_seqs=4, max_num_batched_tokens=8, chunked_prefill=False)
    sched = Scheduler(config, [pt])
    first, second = make_request(6, 8, t=0), make_request(6, 8, t=1)
    sched.add(first)
    sched.add(second)
    log, steps = [], 0
    while sched.has_work() and steps < 200:
        run_step(sched, log)
        steps += 1
    assert not sched.has_work()
    assert second.num_preemptions >= 1
    chunks = [s.num_tokens for out in log for s in out.seqs if s.request is second]
    assert chunks[0] == 6  # its prompt, whole
    assert max(chunks) == 8 and chunks.count(8) >= 1  # a recompute of more than 8, chunked
    alone = make_request(6, 8)
    while len(alone.output_ids) < 8:
        alone.output_ids.append(next_token(alone))
    assert first.output_ids == second.output_ids == alone.output_ids
    assert pt.num_used_pages == 0


@settings(max_examples=25, deadline=None)
@given(
    # prompt + max_tokens <= 42 tokens: one sequence always fits the smallest pool (44).
    workload=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 3),
                                st.integers(-1, 1)), min_size=1, max_size=14),
    budget=st.integers(8, 48),
    max_seqs=st.integers(1, 6),
    num_pages=st.integers(12, 40),
    aborts=st.sets(st.integers(0, 13), max_size=3),
    num_shards=st.integers(1, 3),
)
def test_random_workloads_keep_invariants_and_finish(workload, budget, max_seqs, num_pages,
                                                     aborts, num_shards):
    page_size = 4
    pts = [PageTable(num_pages=num_pages, page_size=page_size) for _ in range(num_shards)]
    sched = Scheduler(SchedulerSection(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
                      pts)
    placed: dict[str, int] = {}
    reqs = [make_request(p, m, priority=pr, t=i)
            for i, (p, m, _, pr) in enumerate(workload)]
    arrivals = {i: w[2] for i, w in enumerate(workload)}
    for step in range(2000):
        for i, r in enumerate(reqs):
            if arrivals[i] == step:
                sched.add(r)
            if i in aborts and step == arrivals[i] + 2 and not r.is_finished:
                r.status = Status.FINISHED
                sched.remove(r)
        out = run_step(sched)
        for shard in range(num_shards):  # budgets and slots hold per data shard
            assert sum(s.num_tokens for s in out.seqs if s.request.shard == shard) <= budget
            assert sum(r.shard == shard for r in sched.running) <= max_seqs
        assert len({s.request.request_id for s in out.seqs}) == len(out.seqs)
        for req in out.preempted:
            placed.pop(req.request_id, None)  # a preempted request may be placed anew
        for s in out.seqs:
            assert s.num_tokens >= 1
            req = s.request
            # No migration while running: a request stays on the shard that admitted it.
            assert placed.setdefault(req.request_id, req.shard) == req.shard
            if req.is_finished:
                continue
            assert len(pts[req.shard].pages(req.request_id)) * page_size \
                >= req.num_computed_tokens
            assert all(not other.pages(req.request_id)
                       for i, other in enumerate(pts) if i != req.shard)
        for pt in pts:
            pt.check_integrity()
        if step > max(arrivals.values()) and not sched.has_work():
            break
    assert not sched.has_work()
    for i, r in enumerate(reqs):
        if i not in aborts:
            assert len(r.output_ids) == r.params.max_tokens  # nothing lost
            # Same tokens as the request would get alone (recompute is exact here).
            ref = make_request(len(r.prompt_ids), r.params.max_tokens)
            while len(ref.output_ids) < ref.params.max_tokens:
                ref.output_ids.append(next_token(ref))
            assert r.output_ids == ref.output_ids
    assert all(pt.num_used_pages == 0 for pt in pts)


@pytest.mark.parametrize("decode_steps", [1, 3])
def test_no_step_after_the_last_token_is_on_its_way(decode_steps):
    """As the engine runs it, a step is dispatched before the previous one is read back.
    A request whose max_tokens-th token is in flight is not scheduled again: each request
    samples exactly max_tokens tokens, none past them."""
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=4, max_num_batched_tokens=32,
                                       decode_steps=decode_steps), [pt])
    reqs = [make_request(5, max_tokens=m, t=float(i)) for i, m in enumerate([1, 2, 5, 7])]
    for r in reqs:
        sched.add(r)
    sampled = dict.fromkeys((r.request_id for r in reqs), 0)
    in_flight = []
    for _ in range(100):
        out = sched.schedule()
        for s in out.seqs:
            if s.samples:
                s.request.num_pending += s.steps
                sampled[s.request.request_id] += s.steps
        previous, in_flight = in_flight, [s for s in out.seqs if s.samples]
        for s in previous:  # the previous step's tokens come back
            req = s.request
            req.num_pending -= s.steps
            for _ in range(s.steps):
                if not req.is_finished:
                    req.output_ids.append(next_token(req))
                    if len(req.output_ids) >= req.params.max_tokens:
                        req.status = Status.FINISHED
                        sched.remove(req)
        if not sched.has_work() and not in_flight:
            break
    assert sampled == {r.request_id: r.params.max_tokens for r in reqs}
    assert pt.num_used_pages == 0


def test_pipeline_stages_split_the_batch_into_micro_batches_in_flight():
    """Two stages: a sequence's token comes back two ticks after it went in, so the running
    batch alternates between two micro-batches and every tick has work."""
    import collections

    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=4, max_num_batched_tokens=64), [pt],
                      stages=2)
    reqs = [make_request(3, max_tokens=5) for _ in range(4)]
    for r in reqs:
        sched.add(r)
    pipeline: collections.deque = collections.deque()
    ticks = []
    while sched.has_work() or any(out.seqs for out in pipeline):
        out = sched.schedule()
        for s in out.seqs:  # dispatched: the sampled token is on its way (as Runner.execute)
            s.request.num_pending += s.samples
        pipeline.append(out)
        ticks.append({reqs.index(s.request) for s in out.seqs})
        if len(pipeline) == 2:  # the micro-batch of two ticks ago leaves the last stage
            for s in pipeline.popleft().seqs:
                if s.samples:
                    s.request.num_pending -= 1
                    run_token(sched, s.request)
        pt.check_integrity()
    assert ticks[:6] == [{0, 1}, {2, 3}] * 3
    assert all(len(r.output_ids) == 5 for r in reqs)
    assert pt.num_used_pages == 0


def run_token(sched: Scheduler, req: Request) -> None:
    req.output_ids.append(next_token(req))
    if len(req.output_ids) >= req.params.max_tokens:
        req.status = Status.FINISHED
        sched.remove(req)


def run_multi_step(sched: Scheduler) -> list[tuple[str, int]]:
    """`multi_step`, as (request id, steps) of the scheduled sequences."""
    return [(s.request.request_id, s.steps) for s in multi_step(sched).seqs]


def multi_step(sched: Scheduler) -> SchedulerOutput:
    """One schedule; the simulated device samples every step of each sequence."""
    out = sched.schedule()
    for s in out.seqs:
        req = s.request
        assert s.start + s.num_tokens + s.steps - 1 == req.num_computed_tokens
        if s.samples:
            for _ in range(s.steps):
                req.output_ids.append(next_token(req))
            if len(req.output_ids) >= req.params.max_tokens:
                req.status = Status.FINISHED
                sched.remove(req)
    return out


def test_multi_step_decode_only_while_every_request_decodes_and_no_one_could_be_admitted():
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=2, max_num_batched_tokens=16,
                                       decode_steps=4), [pt])
    a = make_request(5, max_tokens=30)
    sched.add(a)
    assert run_multi_step(sched) == [(a.request_id, 1)]  # its prefill: a single step
    assert run_multi_step(sched) == [(a.request_id, 4)]  # it decodes: 4 steps
    assert len(pt.pages(a.request_id)) * 4 >= a.num_computed_tokens  # pages for all 4
    b = make_request(9, max_tokens=3, t=1.0)
    sched.add(b)  # a seat is free: single steps until b decodes too
    assert run_multi_step(sched) == [(a.request_id, 1), (b.request_id, 1)]
    # both decode; b may take 2 more tokens (max_tokens)
    assert run_multi_step(sched) == [(a.request_id, 4), (b.request_id, 2)]
    assert b.status is Status.FINISHED and len(b.output_ids) == 3
    c, d = make_request(3, max_tokens=8, t=2.0), make_request(3, max_tokens=8, t=3.0)
    sched.add(c)  # a seat is free again
    assert run_multi_step(sched) == [(a.request_id, 1), (c.request_id, 1)]
    sched.add(d)  # no seat for d: a and c go on 4 steps at a time
    assert run_multi_step(sched) == [(a.request_id, 4), (c.request_id, 4)]
    assert run_multi_step(sched) == [(a.request_id, 4), (c.request_id, 3)]  # c's last 3
    assert c.status is Status.FINISHED and len(c.output_ids) == 8
    assert run_multi_step(sched) == [(a.request_id, 1), (d.request_id, 1)]  # d admitted


@pytest.mark.parametrize("num_pages", range(6, 14))
def test_a_multi_step_call_carries_only_decodes(num_pages):
    """A multi-step call's program runs decode attention only. When a preemption inside
    such a tick frees a seat, nobody is admitted into the call: the next tick, in single
    steps, admits. Every request still finishes with all its tokens."""
    pt = PageTable(num_pages=num_pages, page_size=4)
    sched = Scheduler(SchedulerSection(max_num_seqs=2, max_num_batched_tokens=16,
                                       decode_steps=4), [pt])
    reqs = [make_request(3, max_tokens=12, t=float(i)) for i in range(4)]
    for r in reqs:
        sched.add(r)
    preempted = 0
    for _ in range(200):
        out = multi_step(sched)
        preempted += len(out.preempted)
        if any(s.steps > 1 for s in out.seqs):
            assert all(s.num_tokens == 1 for s in out.seqs), \
                [(s.request.request_id, s.start, s.num_tokens, s.steps) for s in out.seqs]
        if not sched.has_work():
            break
    assert not sched.has_work() and all(len(r.output_ids) == 12 for r in reqs)
    assert pt.num_used_pages == 0
    if num_pages < 9:
        assert preempted  # the pool is small enough to preempt inside multi-step ticks


def test_multi_step_decode_stops_at_the_last_step_min_tokens_bans_stops_in():
    pt = PageTable(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerSection(decode_steps=4), [pt])
    req = Request("m", [1, 2, 3], SamplingParams(max_tokens=20, min_tokens=6), seed=0,
                  arrival_time=0.0)
    sched.add(req)
    steps = [run_multi_step(sched)[0][1] for _ in range(5)]
    # prefill samples output 0; outputs 1-4 (all still banned), then 5 (the last banned,
    # cut short), then free calls of 4
    assert steps == [1, 4, 1, 4, 4]
