"""Helpers the engine tests share: build an engine on the demo model, run requests to the
end while checking pages after every step, compare two runs' outputs."""

import math

import numpy as np

from jaxserve.engine.engine import Engine
from jaxserve.models.model_config import ModelConfig

REPEAT = "The cat sat on the mat. The dog sat on the log. " * 3 + "The cat sat on the"
PAGE_BYTES = 2 * 30 * 16 * 3 * 64 * 4  # K and V, 30 layers, 16 tokens, 3 heads x 64, f32


def assert_same(got, want, rid):
    """The same tokens, text, finish reason and logprob token ids; logprob values within
    1e-4 (a step that verifies computes a position's logits in another batch shape than a
    decode step, so they may differ in float32's last bits)."""
    assert got[:3] == want[:3], rid
    assert [t for t, _ in got[3]] == [t for t, _ in want[3]], rid
    np.testing.assert_allclose([lp for _, lp in got[3]], [lp for _, lp in want[3]],
                               rtol=0, atol=1e-4, err_msg=rid)


def make_engine(demo_config, demo_model, **overrides) -> Engine:
    m = demo_model
    return Engine(demo_config.replace(**overrides), m.model_config, m.params, m.tokenizer,
                  m.mesh)


def save_tiny_shape(path):
    """A two-layer random llama shape that compiles in seconds, for
    `checkpoint.random_shape`; returns `path`."""
    ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=16, name="tiny").save(path)
    return path


def generate_all(engine: Engine, prompts, params) -> dict[str, list[int]]:
    """All prompts at once, as requests r0, r1, ...; {id: generated ids}. Every page is
    back in the pool after."""
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"r{i}")
    out = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert engine.stats().pages_used == 0
    return out


def run(engine: Engine, requests, arrive_every: int = 0):
    """Add the requests (one every `arrive_every` steps, or all at once) and step until
    done, checking after every step that each running request holds exactly the pages of
    the tokens it has computed (rejected tokens' pages were given back).
    Returns {id: (tokens, text, finish reason, [(token id, logprob)])} and {id: final
    metrics}."""
    results, metrics = {}, {}
    pending, step = list(requests), 0
    ps = engine.config.cache.page_size

    def holds_its_pages(req):
        pages = engine.page_tables[req.shard].pages(req.request_id)
        assert len(pages) == math.ceil(req.num_computed_tokens / ps), req.request_id

    process = engine._process

    def process_and_check(handle, out):  # right after a verification is read back
        process(handle, out)
        for req, _, _ in handle.rows:
            if req in engine.scheduler.running:
                holds_its_pages(req)
    engine._process = process_and_check
    while pending or engine.has_unfinished():
        if pending and (arrive_every == 0 or step % arrive_every == 0):
            for rid, ids, params in (pending if arrive_every == 0 else pending[:1]):
                engine.add_request(ids, params, request_id=rid)
                results[rid] = [[], "", None, []]
            pending = [] if arrive_every == 0 else pending[1:]
        for out in engine.step():
            r = results[out.request_id]
            r[0] += out.token_ids
            r[1] += out.text
            r[3] += [(lp.token_id, lp.logprob) for lp in out.logprobs]
            if out.finished:
                r[2] = out.finish_reason
                metrics[out.request_id] = out.metrics
        step += 1
        for req in engine.scheduler.running:
            holds_its_pages(req)
        for pt in engine.page_tables:
            pt.check_integrity()
    assert engine.stats().pages_used == 0
    return {k: tuple(v) for k, v in results.items()}, metrics
