"""Admission and preemption on a tight KV pool (the real engine, the demo model): a request
is admitted only when its whole prefill fits the pages free, so it never preempts itself
at its next chunk and comes back from scratch in the same tick; a preempted request keeps
its place in the queue (FCFS among equals)."""

from engine_checks import PAGE_BYTES, make_engine, run

from jaxserve.engine.request import SamplingParams


def log_schedules(engine, on_out):
    """Call on_out(tick, scheduler output) after every schedule()."""
    sched = engine.scheduler
    schedule = sched.schedule

    def logged():
        out = schedule()
        on_out(sched.tick, out)
        return out
    sched.schedule = logged


def test_a_request_is_not_preempted_and_admitted_again_in_one_tick(demo_config, demo_model):
    """B (penalties: no prefix cache) needs more pages than are free beside A. Admitted with
    its first chunk alone, it could not get its second chunk's pages the next tick, preempted
    itself, and the same tick admitted it again from scratch: 30 ticks in a row, about 1865
    prefill tokens thrown away."""
    engine = make_engine(demo_config, demo_model, cache__kv_cache_memory=13 * PAGE_BYTES,
                         cache__max_model_len=128, scheduler__max_num_seqs=2)
    assert engine.runner.num_pages == 13  # 12 usable pages of 16 tokens; budget 64 tokens
    a = [(j * 13) % 900 + 20 for j in range(90)]
    b = [(j * 17 + 5) % 900 + 20 for j in range(100)]
    reqs = [("A", a, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)),
            ("B", b, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                    repetition_penalty=1.1))]
    again = []

    def on_out(tick, out):
        preempted = {r.request_id for r in out.preempted}
        again.extend((tick, s.request.request_id) for s in out.seqs
                     if s.request.request_id in preempted)
    log_schedules(engine, on_out)
    results, _ = run(engine, reqs)
    assert len(results["A"][0]) == 30 and len(results["B"][0]) == 20
    assert again == []
    assert engine.scheduler.num_preemptions == 0


def test_a_preempted_request_keeps_its_place_in_the_queue(demo_config, demo_model):
    """B, preempted, went behind C and D (which arrived after it), which then took the
    pages its preemption freed and were preempted in turn."""
    engine = make_engine(demo_config, demo_model, cache__kv_cache_memory=7 * PAGE_BYTES,
                         cache__max_model_len=64, scheduler__max_num_seqs=2)
    assert engine.runner.num_pages == 7  # 6 usable pages of 16 tokens
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    base = demo_model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    reqs = [(name, [(t + i * 7) % 1000 + 10 for t in base[:20]], params)
            for i, name in enumerate("ABCD")]
    events, admitted = [], set()

    def on_out(tick, out):
        for r in out.preempted:
            events.append(("preempt", r.request_id))
            admitted.discard(r.request_id)
        for s in out.seqs:
            if s.request.request_id not in admitted:
                admitted.add(s.request.request_id)
                events.append(("admit", s.request.request_id))
    log_schedules(engine, on_out)
    results, _ = run(engine, reqs)
    assert all(len(results[n][0]) == 40 for n in "ABCD")
    assert events[:2] == [("admit", "A"), ("admit", "B")]
    first = events.index(("preempt", "B"))
    after = [rid for kind, rid in events[first:] if kind == "admit"]
    assert after[0] == "B", events  # before C and D, which arrived after it
    assert engine.scheduler.num_preemptions == 2
