"""The offline API on the demo: a prompt that fails carries its error, and an interrupted
generate() leaves the engine empty for the next call."""

import pytest

from jaxserve.engine.request import FinishReason, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time"]


def test_a_failed_prompt_carries_its_error_and_the_others_finish(demo_llm, monkeypatch):
    engine = demo_llm.engine
    bad = engine.inputs.encode(PROMPTS[1])
    append = engine._append

    def faulty(tracked, token, logprob):
        if tracked.request.prompt_ids == bad:
            raise RuntimeError("injected fault")
        return append(tracked, token, logprob)

    monkeypatch.setattr(engine, "_append", faulty)
    good, failed = demo_llm.generate(PROMPTS, GREEDY)
    assert good.finish_reason is FinishReason.LENGTH and len(good.token_ids) == 6
    assert good.error is None
    assert failed.finish_reason is FinishReason.ERROR
    assert failed.error == "RuntimeError: injected fault"
    assert engine.stats().pages_used == 0


def test_an_interrupted_generate_leaves_the_engine_empty(demo_llm, monkeypatch):
    engine = demo_llm.engine
    before = demo_llm.generate(PROMPTS, GREEDY)
    step, calls = engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C in the middle of the run
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_llm.generate(PROMPTS, GREEDY)
    monkeypatch.undo()
    assert not engine.has_unfinished() and engine.stats().pages_used == 0
    after = demo_llm.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
