"""runner.dispatch_thread: the compiled calls made by a thread of their own give the same
tokens as calls made inline, and a call that fails there fails the engine's step without
failing the steps after it."""

import dataclasses
import re
import threading

import jax
import pytest
from engine_checks import REPEAT, make_engine, run

from jaxserve.engine.request import FinishReason, SamplingParams


def calls_on(engine) -> list[str]:
    """Record the name of the thread that makes each of the engine's compiled calls."""
    names, run_call = [], engine.runner._run

    def recorded(*args):
        names.append(threading.current_thread().name)
        return run_call(*args)

    engine.runner._run = recorded
    return names


def test_the_dispatch_thread_gives_the_tokens_of_inline_calls(demo_config, demo_model,
                                                              mixed_sampling):
    tok = demo_model.tokenizer
    ps = [tok.encode(REPEAT * (1 + i % 3) + f" {i}") for i in range(len(mixed_sampling))]
    assert max(len(p) for p in ps) > 64  # longer than the token budget: chunked prefill
    # every request seeded (an unseeded one draws its seed at arrival)
    requests = [(f"m{i}", ids, dataclasses.replace(p, seed=100 + i)) for i, (ids, p) in
                enumerate(zip(ps, mixed_sampling, strict=True))]
    results, threads = {}, {}
    for dispatch in (False, True):
        engine = make_engine(demo_config, demo_model, runner__dispatch_thread=dispatch)
        threads[dispatch] = calls_on(engine)
        results[dispatch], _ = run(engine, requests, arrive_every=1)
        engine.close()
    assert results[True] == results[False]
    assert all(len(r[0]) > 0 for r in results[True].values())
    assert set(threads[False]) == {threading.current_thread().name}
    assert len(threads[True]) == len(threads[False]) > 10
    assert all(name.startswith("jaxserve-step") for name in threads[True])


def test_a_call_that_fails_on_the_dispatch_thread_fails_one_step_only(demo_config,
                                                                      demo_model):
    ids = demo_model.tokenizer.encode("A call that fails on its thread, then the same prompt")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine = make_engine(demo_config, demo_model, runner__dispatch_thread=True)
    cold = run(engine, [("cold", ids, params)])[0]["cold"]
    run_call, failed = engine.runner._run, []

    def fails_once(*args):
        if not failed:
            failed.append(threading.current_thread().name)
            raise RuntimeError("injected call fault")
        return run_call(*args)

    engine.runner._run = fails_once
    engine.add_request(ids, params, request_id="failed")
    with pytest.raises(RuntimeError, match="injected call fault"):
        for _ in range(3):  # the failure surfaces when the engine reads the step back
            engine.step()
    assert failed[0].startswith("jaxserve-step")
    assert engine.abort("failed")  # what the server's loop and the offline API do then
    assert [o.finish_reason for o in engine.step()] == [FinishReason.ABORT]
    assert engine.stats().pages_used == 0 and not engine.has_unfinished()
    # the step dispatched after the failed one is dropped with it, not failed again later
    assert run(engine, [("again", ids, params)])[0]["again"] == cold
    engine.close()


def test_programs_compile_under_the_callers_jax_settings(demo_config, demo_model):
    """JAX's settings are per thread: a program warm-up did not compile must be compiled on
    the engine's thread, or default_matmul_precision set around the step is lost (on the
    dispatch thread its dots compiled at the default precision)."""
    engine = make_engine(demo_config, demo_model, runner__dispatch_thread=True,
                         runner__compilation_cache_dir=None)
    ids = demo_model.tokenizer.encode("The capital of France is")
    with jax.default_matmul_precision("highest"):
        run(engine, [("r", ids, SamplingParams(max_tokens=3, temperature=0.0))])
    engine.close()
    assert engine.runner._compiled  # compiled on the way, with no warm-up
    for program in engine.runner._compiled.values():
        dots = re.findall(r"operand_precision=\{([^}]*)\}", program.as_text())
        assert dots and set(dots) == {"highest,highest"}
