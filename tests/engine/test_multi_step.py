"""Multi-step decode on the demo model: output identical to single steps (greedy and seeded
sampling, stop strings and stop ids inside a call, max_tokens and min_tokens that end or
cut a call short, penalties, logprobs), under arrivals and preemption and on data and
tensor shards; every page back in the pool; the calls were in fact multi-step."""

import pytest
from engine_checks import PAGE_BYTES, REPEAT, assert_same, make_engine, run

from jaxserve.config import config_from_dict
from jaxserve.engine.request import FinishReason, SamplingParams
from jaxserve.errors import ConfigError

K = 4


@pytest.fixture(scope="module")
def workload(demo_model):
    tok = demo_model.tokenizer
    rep, plain = tok.encode(REPEAT), tok.encode("Write a short poem about the sea and a ship.")
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        ("rep", rep, SamplingParams(max_tokens=24, logprobs=2, **greedy)),
        ("plain", plain, SamplingParams(max_tokens=17, **greedy)),  # not a multiple of K
        ("short", rep, SamplingParams(max_tokens=2, **greedy)),  # fewer than K in all
        ("stop", rep, SamplingParams(max_tokens=24, stop=("log",), **greedy)),
        ("eos-id", rep, SamplingParams(max_tokens=24, stop_token_ids=(tok.encode(" dog")[0],),
                                       **greedy)),
        ("eos", plain, SamplingParams(max_tokens=40, temperature=0.0)),  # EOS may end it
        # output tokens counted by steps inside a call change what follows
        ("penalty", rep, SamplingParams(max_tokens=13, repetition_penalty=1.3, **greedy)),
        ("counts", plain, SamplingParams(max_tokens=20, frequency_penalty=1.5,
                                         presence_penalty=0.5, **greedy)),
        ("sampled", rep, SamplingParams(max_tokens=21, temperature=0.8, top_p=0.95, seed=3,
                                        ignore_eos=True)),
        # bans on EOS / the stop id end inside a call: calls are cut at token 7
        ("min-tokens", rep, SamplingParams(max_tokens=12, min_tokens=7, temperature=0.0,
                                           stop_token_ids=(tok.encode(" dog")[0],))),
    ]


@pytest.fixture(scope="module")
def baseline(demo_config, demo_model, workload):
    return run(make_engine(demo_config, demo_model), workload)[0]


def count_calls(engine):
    """Wrap the runner's dispatch: counts of single-step and multi-step calls."""
    calls = {1: 0, K: 0}
    execute = engine.runner.execute

    def counted(sched, page_tables, prev):
        handle = execute(sched, page_tables, prev)
        calls[handle.steps] += 1
        return handle
    engine.runner.execute = counted
    return calls


def test_output_is_unchanged_and_calls_run_several_steps(demo_config, demo_model, workload,
                                                         baseline):
    engine = make_engine(demo_config, demo_model, scheduler__decode_steps=K)
    engine.warm_up(progress=False)
    compiled = engine.stats().num_compilations
    calls = count_calls(engine)
    results, _ = run(engine, workload)
    assert baseline["stop"][2] is FinishReason.STOP  # the stop string did end it
    assert baseline["eos-id"][2] is FinishReason.STOP
    assert baseline["min-tokens"][2] is FinishReason.STOP
    assert len(baseline["min-tokens"][0]) >= 7
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # 24 tokens of the longest request: one prefill step, then mostly calls of K steps
    assert calls[K] >= 4
    assert calls[1] + calls[K] < 24
    assert engine.stats().num_compilations == compiled  # warm-up compiled the K-step programs


def test_output_is_unchanged_with_arrivals_and_preemption(demo_config, demo_model, workload,
                                                          baseline):
    # 12 pages of 16 tokens for requests of ~45-60 tokens each: preemption is certain; a
    # request arrives every step, so single steps (admissions) and K-step calls mix.
    engine = make_engine(demo_config, demo_model, scheduler__decode_steps=K,
                         cache__kv_cache_memory=12 * PAGE_BYTES, cache__max_model_len=128)
    calls = count_calls(engine)
    results, _ = run(engine, workload, arrive_every=1)
    assert engine.scheduler.num_preemptions > 0
    assert calls[K] > 0
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)


def test_output_is_unchanged_on_data_and_tensor_shards(demo_config, workload, baseline):
    from jaxserve.engine.engine import Engine
    from jaxserve.loader import load_model
    from sharding.mesh import MeshConfig
    config = demo_config.replace(mesh=MeshConfig(data=2, tensor=3), scheduler__decode_steps=K)
    m = load_model(config, progress=False)
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    calls = count_calls(engine)
    results, _ = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    assert calls[K] > 0


def test_config_refuses_what_it_cannot_combine():
    with pytest.raises(ConfigError, match="decode_steps: must be >= 1"):
        config_from_dict({"scheduler": {"decode_steps": 0}})
    with pytest.raises(ConfigError, match="decode_steps: .4. needs mesh.pipeline: 1"):
        config_from_dict({"scheduler": {"decode_steps": 4}, "mesh": {"pipeline": 2}})
    with pytest.raises(ConfigError, match="decode_steps: .4. needs mesh.pipeline: 1 and "
                                          "speculative decoding off"):
        config_from_dict({"scheduler": {"decode_steps": 4},
                          "speculative": {"method": "ngram"}})


def test_a_program_run_on_padding_changes_nothing_but_the_null_page(demo_config, demo_model):
    """Warm-up on a GPU runs every program once on padding (runner.run_padding): the KV
    pages other than the null page (0) and the penalty tables must stay as they were."""
    import jax
    import numpy as np
    engine = make_engine(demo_config, demo_model, scheduler__decode_steps=K)
    runner = engine.runner
    programs = runner.step_programs()
    assert (16, 4, 1, K) in programs and (16, 16, 1, K) in programs
    ones = jax.tree.map(lambda a: jax.numpy.ones_like(a), runner.state)
    runner.state = ones
    for bucket in programs:
        runner.run_padding(bucket)
    state = jax.tree.map(np.asarray, runner.state)
    for name in ("prompt_mask", "output_counts"):
        assert (getattr(state, name) == 1).all(), name
    for pages in (state.k_pages, state.v_pages):
        assert (pages[:, 1:] == 1).all()
