"""Speculative decoding through gRPC: usage reports the proposed and accepted tokens, a
request can opt out, and the Prometheus counters add up."""

import pytest

from jaxserve.config import SpeculativeSection
from jaxserve.engine.request import SamplingParams
from jaxserve.server.client import Client

REPEAT = "The cat sat on the mat. The dog sat on the log. " * 3 + "The cat sat on the"


@pytest.fixture(scope="module")
def served(server_config, start_server):
    config = server_config.replace(speculative=SpeculativeSection(method="ngram"))
    with start_server(config) as (thread, port):
        yield thread.server, port


def counter(server, name):
    return server.metrics.registry.get_sample_value(name + "_total") or 0.0


def test_usage_and_metrics_report_speculation(served, wait, pages_back):
    server, port = served
    greedy = dict(max_tokens=20, temperature=0.0, ignore_eos=True)
    with Client("127.0.0.1", port) as c:
        spec = c.generate_unary(REPEAT, SamplingParams(**greedy), timeout=120)
        plain = c.generate_unary(REPEAT, SamplingParams(speculative=False, **greedy),
                                 timeout=120)
    assert list(spec.token_ids) == list(plain.token_ids)
    assert spec.usage.accepted_tokens >= 10
    assert spec.usage.draft_tokens >= spec.usage.accepted_tokens
    assert plain.usage.draft_tokens == plain.usage.accepted_tokens == 0
    wait(lambda: counter(server, "jaxserve_spec_accepted_tokens") == spec.usage.accepted_tokens,
         30, what="the accepted-token counter")
    assert counter(server, "jaxserve_spec_draft_tokens") == spec.usage.draft_tokens
    assert counter(server, "jaxserve_spec_verify_steps") >= 1
