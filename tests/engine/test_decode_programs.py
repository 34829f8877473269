"""Decode-only programs (runner.decode_programs): a step whose sequences each compute one
token runs a program of its own, whose attention on a GPU launches the decode kernel alone.
On this CPU both programs run the reference attention, so these tests check the routing:
which steps take which program, the same output as without them, pages back in the pool,
no compilation after warm-up, and the configurations refused."""

import pytest
from engine_checks import PAGE_BYTES, REPEAT, assert_same, make_engine, run

from jaxserve.config import config_from_dict, load_config
from jaxserve.engine.batch_builder import BatchBuilder
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import Request, SamplingParams
from jaxserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from jaxserve.errors import ConfigError


@pytest.fixture(scope="module")
def workload(demo_model):
    tok = demo_model.tokenizer
    rep, plain = tok.encode(REPEAT), tok.encode("Write a short poem about the sea and a ship.")
    return [
        ("rep", rep, SamplingParams(max_tokens=11, logprobs=2, temperature=0.0,
                                    ignore_eos=True)),
        ("plain", plain, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)),
        ("sampled", rep, SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=3,
                                        ignore_eos=True)),
        ("penalty", plain, SamplingParams(max_tokens=8, repetition_penalty=1.3,
                                          temperature=0.0, ignore_eos=True)),
    ]


def count_programs(engine):
    """Wrap the runner's dispatch: the buckets of the steps it ran, in order."""
    buckets = []
    run_step = engine.runner._run

    def counted(bucket, buffer, prev_tokens):
        buckets.append(tuple(bucket))
        return run_step(bucket, buffer, prev_tokens)
    engine.runner._run = counted
    return buckets


@pytest.fixture(scope="module")
def baseline(demo_config, demo_model, workload):
    engine = make_engine(demo_config, demo_model, runner__decode_programs=False)
    buckets = count_programs(engine)
    results = run(engine, workload)[0]
    assert buckets and all(b[3] == 0 for b in buckets)  # off: general steps only
    return results


def test_decode_steps_run_the_decode_program_with_the_same_output(demo_config, demo_model,
                                                                 workload, baseline):
    engine = make_engine(demo_config, demo_model, runner__decode_programs=True)
    programs = engine.runner.step_programs()
    # the demo's buckets: tokens (16, 64, ...), sequences (4, 16); 16 slots decode in the
    # 16-token bucket with 4 or 16 sequences
    assert (16, 4, 1, 1) in programs and (16, 16, 1, 1) in programs
    assert [p for p in programs if p[3] == 1] == [(16, 4, 1, 1), (16, 16, 1, 1)]
    engine.warm_up(progress=False)
    compiled = engine.stats().num_compilations
    buckets = count_programs(engine)
    results, _ = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # general steps while a prompt is computed (two here), then the decodes of the longest
    # request's last 9 tokens (11 in all) each in a decode-only step
    assert [b[3] for b in buckets] == [0, 0] + [1] * 9
    assert engine.stats().num_compilations == compiled
    assert engine.stats().pages_used == 0


def test_decode_programs_mix_with_arrivals_and_preemption(demo_config, demo_model, workload,
                                                          baseline):
    # a request arrives every step, so general steps (admissions) and decode-only ones mix;
    # 9 pages of 16 tokens (one the null page) for requests of 21-57 tokens: preemption
    engine = make_engine(demo_config, demo_model, runner__decode_programs=True,
                         cache__kv_cache_memory=9 * PAGE_BYTES, cache__max_model_len=128)
    buckets = count_programs(engine)
    results, _ = run(engine, workload, arrive_every=1)
    assert engine.scheduler.num_preemptions > 0
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    assert {b[3] for b in buckets} == {0, 1}
    assert engine.stats().pages_used == 0


def test_decode_programs_beside_multi_step_decode(demo_config, demo_model, workload, baseline):
    engine = make_engine(demo_config, demo_model, runner__decode_programs=True,
                         scheduler__decode_steps=4)
    assert {p[3] for p in engine.runner.step_programs()} == {0, 1, 4}
    buckets = count_programs(engine)
    results, _ = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # calls of 4 steps while any request has more than one token to go; the longest
    # request's last token (11 - 2 = 4 + 4 + 1) in a decode-only step of its own
    assert {b[3] for b in buckets} == {0, 1, 4}
    assert engine.stats().pages_used == 0


def _request(rid, prompt_len, output=()):
    req = Request(rid, list(range(100, 100 + prompt_len)),
                  SamplingParams(temperature=0.0), seed=1, arrival_time=0.0)
    req.output_ids = list(output)
    return req


@pytest.mark.parametrize("decode_programs", [False, True])
def test_the_batch_builder_picks_the_program_by_tokens_per_sequence(decode_programs):
    config = load_config("configs/smollm2-135m-cpu.yaml").replace(
        cache__page_size=4, cache__max_model_len=64, scheduler__max_num_seqs=8,
        scheduler__max_num_batched_tokens=16, runner__token_buckets=(16,),
        runner__seq_buckets=(8,))
    builder = BatchBuilder(config, num_shards=1, stages=1, eos_ids=[2],
                           decode_programs=decode_programs)
    table = PageTable(num_pages=64, page_size=4)
    decode = _request("decode", 5, output=[7, 8])
    one = _request("one", 1)  # a one-token prompt attends as a decode does
    chunk = _request("chunk", 6)
    for req in (decode, one, chunk):
        table.admit(req.request_id, req.token_ids, use_cache=False)
        assert table.ensure(req.request_id, len(req.token_ids))

    def steps(*seqs):
        mb = builder.micro_batch(SchedulerOutput(tuple(seqs), ()), [table], prev_rows=[])
        return mb.host.layout.steps

    decodes = (ScheduledSeq(decode, 6, 1, samples=True), ScheduledSeq(one, 0, 1, samples=True))
    assert steps(*decodes) == (1 if decode_programs else 0)
    assert steps(*decodes, ScheduledSeq(chunk, 0, 2, samples=False)) == 0


def test_config_refuses_decode_programs_with_pipeline_stages():
    with pytest.raises(ConfigError, match="runner.decode_programs: true needs mesh.pipeline: 1"):
        config_from_dict({"runner": {"decode_programs": True}, "mesh": {"pipeline": 2}})
    config_from_dict({"runner": {"decode_programs": False}, "mesh": {"pipeline": 2}})
