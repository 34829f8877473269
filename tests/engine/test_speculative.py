"""Speculative decoding (n-gram) on the demo model: output identical to decoding without it
(greedy and seeded sampling, stops, logprobs, batched with requests that do not speculate,
under preemption), rejected tokens' pages back in the pool, and proposals that were in
fact accepted."""

import dataclasses

import pytest
from engine_checks import PAGE_BYTES, REPEAT, assert_same, make_engine, run

from jaxserve.config import SpeculativeSection
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import FinishReason, SamplingParams
from jaxserve.engine.speculative import NgramProposer
from jaxserve.errors import ConfigError

SPEC = SpeculativeSection(method="ngram", num_tokens=4)


def test_ngram_proposals():
    p = NgramProposer(SpeculativeSection(method="ngram", ngram_min=1, ngram_max=3))
    assert p.lookup([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # suffix [2, 3] seen at 1
    assert p.lookup([1, 2, 3, 1, 2, 3, 1, 2], 3) == [3, 1, 2]  # longest suffix first
    assert p.lookup([1, 2, 8, 1, 2, 9, 1, 2], 2) == [9, 1]  # the last occurrence
    assert p.lookup([1, 2, 8, 1, 2, 9, 1, 2], 9) == [9, 1, 2]  # as many as follow
    assert p.lookup([5, 6, 7], 2) == []
    two = NgramProposer(SpeculativeSection(method="ngram", ngram_min=2, ngram_max=3))
    assert two.lookup([4, 1, 5, 1], 2) == []  # only a 1-token suffix recurs


def test_config_errors():
    with pytest.raises(ValueError, match="draft_config: method: draft needs"):
        SpeculativeSection(method="draft")
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeSection(method="ngram", num_tokens=0)
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeSection(method="ngram", ngram_min=3, ngram_max=2)


def test_pipeline_stages_refuse_speculation(demo_config):
    from jaxserve.config import config_from_dict
    with pytest.raises(ConfigError, match="speculative.method: ngram needs mesh.pipeline: 1"):
        config_from_dict({"speculative": {"method": "ngram"}, "mesh": {"pipeline": 2}})


@pytest.fixture(scope="module")
def workload(demo_model):
    tok = demo_model.tokenizer
    rep, plain = tok.encode(REPEAT), tok.encode("Write a short poem about the sea and a ship.")
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        ("rep", rep, SamplingParams(max_tokens=24, logprobs=2, **greedy)),
        ("plain", plain, SamplingParams(max_tokens=16, **greedy)),
        ("short", rep, SamplingParams(max_tokens=7, **greedy)),  # max_tokens inside a run
        ("stop", rep, SamplingParams(max_tokens=24, stop=("log",), **greedy)),
        ("eos-id", rep, SamplingParams(max_tokens=24, stop_token_ids=(tok.encode(" dog")[0],),
                                       **greedy)),
        ("optout", rep, SamplingParams(max_tokens=12, speculative=False, **greedy)),
        ("penalty", rep, SamplingParams(max_tokens=12, repetition_penalty=1.3, **greedy)),
        ("sampled", rep, SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=3,
                                        ignore_eos=True)),
        ("min-tokens", rep, SamplingParams(max_tokens=12, min_tokens=6, **greedy)),
    ]


@pytest.fixture(scope="module")
def baseline(demo_config, demo_model, workload):
    return run(make_engine(demo_config, demo_model), workload)[0]


def test_output_is_unchanged_and_proposals_are_accepted(demo_config, demo_model, workload,
                                                        baseline):
    engine = make_engine(demo_config, demo_model, speculative=SPEC)
    engine.warm_up(progress=False)
    compiled = engine.stats().num_compilations
    results, metrics = run(engine, workload)
    assert baseline["stop"][2] is FinishReason.STOP  # the stop string did end it
    assert baseline["eos-id"][2] is FinishReason.STOP
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # The repetitive prompt's continuation was mostly proposed and accepted...
    assert metrics["rep"].accepted_tokens >= 12
    assert metrics["rep"].verify_steps <= 12  # 24 tokens in at most 12 steps
    assert metrics["sampled"].accepted_tokens > 0
    # ... and what may not speculate did not.
    for rid in ("optout", "penalty"):
        assert metrics[rid].draft_tokens == 0, rid
    # Accepted proposals after a stop are not the request's: the first token comes from
    # the prefill, so at most completion - 1 (the stop string and stop id end inside runs).
    for rid, m in metrics.items():
        assert m.accepted_tokens <= m.completion_tokens - 1, (rid, m)
    stats = engine.stats()
    assert stats.accepted_tokens == sum(m.accepted_tokens for m in metrics.values())
    assert stats.draft_tokens > stats.accepted_tokens  # some were rejected (and rolled back)
    assert stats.num_compilations == compiled  # the verification shapes were warmed up


def test_the_step_timers_count_the_proposals_and_what_is_read_back_for_them(demo_config,
                                                                             demo_model):
    """With speculation a step may read back and process the step in flight before
    proposing, then propose: both are phases of the step (outputs, propose), so the phases
    add up to the step's wall time."""
    import time

    engine = make_engine(demo_config, demo_model, speculative=SPEC)
    propose, calls = engine.proposer.propose, []

    def slow_propose(ready, room):
        calls.append(1)
        time.sleep(0.02)  # a proposer that costs a visible 20 ms
        return propose(ready, room)

    engine.proposer.propose = slow_propose
    ids = demo_model.tokenizer.encode(REPEAT)
    engine.add_request(ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                       request_id="a")
    wall = 0.0
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        wall += time.perf_counter() - t
    times = engine.step_times
    assert calls and times.propose >= 0.02 * len(calls)
    phases = times.host + times.wait
    assert phases <= wall and wall - phases < 0.005 * times.steps, (wall, phases, times)


def test_output_is_unchanged_under_preemption(demo_config, demo_model, workload, baseline):
    # 12 pages of 16 tokens for requests of ~45-60 tokens each: preemption is certain.
    engine = make_engine(demo_config, demo_model, speculative=SPEC,
                         cache__kv_cache_memory=12 * PAGE_BYTES, cache__max_model_len=128)
    results, _ = run(engine, workload, arrive_every=2)
    assert engine.scheduler.num_preemptions > 0
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)


def test_rejected_proposals_are_rolled_back(demo_config, demo_model, workload, baseline):
    """A proposer that is always wrong: every step rejects all k tokens, so every step rolls
    back their K/V and pages (crossing page boundaries), and output stays the same."""
    engine = make_engine(demo_config, demo_model, speculative=SPEC)
    vocab = demo_model.model_config.vocab_size
    engine.proposer.lookup = lambda ids, k: [vocab - 1] * k
    results, metrics = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # Nothing accepted: speculation turned itself off after `window` steps.
    assert metrics["rep"].accepted_tokens == 0
    assert metrics["rep"].verify_steps == SPEC.window
    assert metrics["rep"].draft_tokens == 4 * SPEC.window


def test_output_is_unchanged_on_data_and_tensor_shards(demo_config, workload, baseline):
    """Two data shards (each verifying its own sequences) and tensor 3 within each."""
    from jaxserve.loader import load_model
    from sharding.mesh import MeshConfig
    config = demo_config.replace(mesh=MeshConfig(data=2, tensor=3), speculative=SPEC)
    m = load_model(config, progress=False)
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    results, metrics = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    assert engine.runner.num_shards == 2
    assert metrics["rep"].accepted_tokens >= 12


def test_acceptance_that_stays_low_switches_speculation_off(demo_config, demo_model):
    # Every proposal is rejected when min_accepted cannot be met: off after `window` steps.
    spec = SpeculativeSection(method="ngram", num_tokens=4, min_accepted=5.0, window=3)
    engine = make_engine(demo_config, demo_model, speculative=spec)
    ids = demo_model.tokenizer.encode(REPEAT)
    _, metrics = run(engine, [("r", ids, SamplingParams(max_tokens=20, temperature=0.0))])
    assert metrics["r"].verify_steps <= 3
    assert metrics["r"].completion_tokens == 20


def test_sampled_tokens_follow_the_same_distribution(demo_config, demo_model):
    """Unseeded sampling, statistically: where speculation verified two proposals, the two
    tokens that follow have the joint distribution of sampling without speculation
    (chi-square over disjoint seeds; top-k 8 for a small support, temperature 2 for many
    rejections). Categories: (second token accepted the proposal?, third token), so a rule
    that samples the third token after a rejected proposal stands out."""
    from scipy.stats import chi2_contingency
    ids = demo_model.tokenizer.encode(REPEAT)
    lookup = NgramProposer(SPEC).lookup

    def categories(engine, seeds):
        params = SamplingParams(max_tokens=4, temperature=2.0, top_k=8, ignore_eos=True)
        requests = [(f"s{s}", ids, dataclasses.replace(params, seed=s)) for s in seeds]
        results, _ = run(engine, requests)
        out = []
        for s in seeds:
            t1, t2, t3 = results[f"s{s}"][0][:3]
            proposal = lookup([*ids, t1], 2)
            if len(proposal) == 2:
                out.append((t2 == proposal[0], t3))
        return out

    engine = make_engine(demo_config, demo_model, speculative=SPEC)
    spec = categories(engine, range(500))
    assert engine.stats().verify_steps >= len(spec) >= 150
    assert 0.2 < sum(a for a, _ in spec) / len(spec) < 0.9  # accepted and rejected both
    plain = categories(make_engine(demo_config, demo_model), range(1000, 1500))
    cells = sorted(set(spec) | set(plain))
    table = [[spec.count(c) for c in cells], [plain.count(c) for c in cells]]
    assert chi2_contingency(table).pvalue > 0.001


# ----- a draft model --------------------------------------------------------------------

def draft_yaml(tmp_path, demo_config, checkpoint: str, max_model_len: int = 256,
               runner: str = "") -> str:
    """A draft model's config file: small buckets and KV pool, the demo's cache dirs;
    `runner`: more runner settings (YAML flow mapping entries)."""
    c = demo_config
    path = tmp_path / "draft.yaml"
    path.write_text(f"""model: {{name: draft, dtype: float32}}
checkpoint: {{{checkpoint}, cache_dir: {c.checkpoint.cache_dir}}}
cache: {{page_size: 16, kv_cache_memory: 67108864, max_model_len: {max_model_len}}}
scheduler: {{max_num_seqs: 16, max_num_batched_tokens: 64}}
runner: {{token_buckets: [16, 64], seq_buckets: [4, 16],
          compilation_cache_dir: {c.runner.compilation_cache_dir}{runner}}}
""")
    return str(path)


def random_draft_shape(tmp_path, vocab: int) -> str:
    from jaxserve.models.model_config import ModelConfig
    shape = ModelConfig("llama", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        name="random-draft")
    path = tmp_path / "draft-shape.json"
    shape.save(path)
    return str(path)


def test_the_model_as_its_own_draft_is_accepted_and_changes_nothing(
        tmp_path, demo_config, demo_model, workload, baseline):
    spec = SpeculativeSection(method="draft", num_tokens=4,
                              draft_config=draft_yaml(tmp_path, demo_config, "source: demo"))
    engine = make_engine(demo_config, demo_model, speculative=spec)
    results, metrics = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # (proposals after a stop inside an accepted run are not counted as accepted: the
    # requests that end on a stop string or id are left out of the agreement)
    greedy = [rid for rid, _, p in workload if p.temperature == 0 and p.speculative
              and not p.uses_penalties and rid not in ("stop", "eos-id")]
    proposed = sum(metrics[rid].draft_tokens for rid in greedy)
    accepted = sum(metrics[rid].accepted_tokens for rid in greedy)
    assert proposed >= 30 and accepted >= 0.95 * proposed  # the same model agrees with itself
    assert metrics["optout"].draft_tokens == metrics["penalty"].draft_tokens == 0
    draft = engine.proposer
    assert draft.page_table.num_used_pages == 0 and not draft._shadows  # all given back


def test_a_random_draft_is_mostly_rejected_and_changes_nothing(
        tmp_path, demo_config, demo_model, workload, baseline):
    vocab = demo_model.model_config.vocab_size
    checkpoint = f"source: random, random_shape: {random_draft_shape(tmp_path, vocab)}"
    # the target's calls on the dispatch thread; the draft's inline whatever its config
    # says (it reads each step back at once: a thread would only add its hand-over, and
    # Engine.close would leave it running)
    spec = SpeculativeSection(method="draft", num_tokens=3, draft_config=draft_yaml(
        tmp_path, demo_config, checkpoint, runner=", dispatch_thread: true"))
    engine = make_engine(demo_config, demo_model, speculative=spec,
                         runner__dispatch_thread=True)
    assert engine.runner.dispatches_on_thread
    assert not engine.proposer.runner.dispatches_on_thread
    results, metrics = run(engine, workload, arrive_every=2)
    engine.close()
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    assert metrics["rep"].draft_tokens > 0
    assert engine.proposer.page_table.num_used_pages == 0


def test_a_draft_with_a_shorter_context_proposes_only_within_it(
        tmp_path, demo_config, demo_model, workload, baseline):
    """The draft's cache.max_model_len is shorter than the requests grow: it proposes while
    a request fits its context, then no more for it; the output is unchanged."""
    limit = len(demo_model.tokenizer.encode(REPEAT)) + 8
    spec = SpeculativeSection(method="draft", num_tokens=4, draft_config=draft_yaml(
        tmp_path, demo_config, "source: demo", max_model_len=limit))
    engine = make_engine(demo_config, demo_model, speculative=spec)
    results, metrics = run(engine, workload)
    for rid in baseline:
        assert_same(results[rid], baseline[rid], rid)
    # the model is its own draft and agrees with itself: its proposals cover at most the 8
    # tokens left in the draft's context, not the 24 the request produces
    assert 0 < metrics["rep"].draft_tokens <= 8
    draft = engine.proposer
    assert draft.page_table.num_used_pages == 0 and not draft._shadows


@pytest.mark.parametrize("mesh", ["data: 2", "pipeline: 2"])
def test_a_draft_with_data_shards_or_pipeline_stages_is_refused(tmp_path, demo_config,
                                                                demo_model, mesh):
    path = draft_yaml(tmp_path, demo_config, "source: demo")
    with open(path, "a") as f:
        f.write(f"mesh: {{{mesh}}}\n")
    spec = SpeculativeSection(method="draft", draft_config=path)
    with pytest.raises(ConfigError, match=r"draft.yaml has mesh.data \d and mesh.pipeline "
                                          r"\d; a draft runs as one replica"):
        make_engine(demo_config, demo_model, speculative=spec)


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, demo_config, demo_model):
    checkpoint = f"source: random, random_shape: {random_draft_shape(tmp_path, 1000)}"
    spec = SpeculativeSection(method="draft",
                              draft_config=draft_yaml(tmp_path, demo_config, checkpoint))
    with pytest.raises(ConfigError, match="the draft's vocabulary has 1000 tokens, the "
                                          "model's 49152"):
        make_engine(demo_config, demo_model, speculative=spec)


def test_a_bad_draft_config_is_named_before_the_model_loads(tmp_path, demo_config,
                                                           monkeypatch):
    """A missing draft config, or one that speculates itself, was found only once the
    target model had loaded, and the first was not named as speculative.draft_config."""
    from jaxserve import loader

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the draft config was checked")

    monkeypatch.setattr(loader, "checkpoint_dir", no_load)
    missing = tmp_path / "missing.yaml"
    spec = SpeculativeSection(method="draft", draft_config=str(missing))
    with pytest.raises(ConfigError, match=rf"^speculative.draft_config: {missing}: config "
                                          "file not found$"):
        loader.load_model(demo_config.replace(speculative=spec), progress=False)
    path = draft_yaml(tmp_path, demo_config, "source: demo")
    with open(path, "a") as f:
        f.write("speculative: {method: ngram}\n")
    spec = SpeculativeSection(method="draft", draft_config=path)
    with pytest.raises(ConfigError, match=r"draft.yaml speculates itself \(speculative.method: "
                                          r"ngram\)"):
        loader.load_model(demo_config.replace(speculative=spec), progress=False)
