"""The offline API on the demo: a prompt that fails carries its error, an interrupted
generate() leaves the engine empty for the next call, bad prompts are named by index before
any is queued, and requests added to the engine directly do not get in the way."""

import pytest

from jaxserve.engine.llm import PromptError
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


def test_a_bad_prompt_is_named_by_its_index_and_nothing_is_queued(demo_llm):
    engine = demo_llm.engine
    for prompt, field, message in (
            (5, "prompts[1].prompt", "expected text or a list of token ids (got int)"),
            ("a\ud800b", "prompts[1].prompt", "the text is not valid Unicode: a lone "
                                               "surrogate '\\ud800' at character 1"),
            ({"messages": [{"role": "user", "content": "x\udc00"}]}, "prompts[1].messages",
             "the text is not valid Unicode"),
            ("word " * 2100, "prompts[1].prompt", "the prompt has")):
        with pytest.raises(PromptError) as e:
            demo_llm.generate([PROMPTS[0], prompt], GREEDY)
        assert e.value.index == 1 and e.value.field == field, e.value
        assert e.value.message.startswith(message), e.value
        assert not engine.has_unfinished()


def test_requests_added_to_the_engine_directly_do_not_get_in_the_way(demo_llm):
    """The engine's own automatic ids (req-N) and a caller's ids never collide with
    generate()'s, and outputs of other requests are not taken for its own."""
    engine = demo_llm.engine
    alone = demo_llm.generate(PROMPTS, GREEDY)
    ids = engine.inputs.encode(PROMPTS[0])
    for request_id in ("req-0", "req-1", None):
        engine.add_request(ids, GREEDY, request_id)
    together = demo_llm.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert not engine.has_unfinished() and engine.stats().pages_used == 0


def test_one_stop_string_or_token_id_is_not_split():
    params = SamplingParams(stop="END", stop_token_ids=7)
    assert params.stop == ("END",) and params.stop_token_ids == (7,)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
