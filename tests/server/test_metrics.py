"""jaxserve_requests_total counts every RPC once, under the code its client got and the
method's short name: deadlines (also short ones), cancels, missing tokens, requests and
responses over server.max_message_bytes."""

import grpc
import pytest

from jaxserve.engine.request import SamplingParams
from jaxserve.server.client import Client

TOKEN = "metrics-token"
LIMIT = 8 * 1024
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(server_config, start_server):
    config = server_config.replace(server__auth_token=TOKEN, server__max_message_bytes=LIMIT)
    with start_server(config) as (thread, port):
        yield thread.server, port


def counted(server, method, code):
    return server.metrics.registry.get_sample_value(
        "jaxserve_requests_total", {"method": method, "code": code}) or 0.0


def latency_count(server) -> float:
    return server.metrics.registry.get_sample_value(
        "jaxserve_request_latency_seconds_count") or 0.0


def test_a_fresh_server_reports_its_warm_up_not_zeros(server_config, start_server):
    """Before its first request: every page free, warm-up's compilations counted."""
    with start_server(server_config) as (thread, port):
        engine, registry = thread.server.engine, thread.server.metrics.registry
        stats = engine.stats()
        assert stats.pages_free > 0 and stats.num_compilations > 0
        assert registry.get_sample_value("jaxserve_kv_pages_free") == stats.pages_free
        assert registry.get_sample_value("jaxserve_compilations_total") == \
            stats.num_compilations
        with Client("127.0.0.1", port) as c:
            assert c.model_info(timeout=30).num_compilations == stats.num_compilations


def expect(server, wait, method, code, before, n=1):
    wait(lambda: counted(server, method, code) == before + n, 30,
         what=f"{n} more {method} {code}")
    assert counted(server, method, code) == before + n


def failure(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        result = call()
        list(result) if not hasattr(result, "usage") else result
    return e.value.code()


def test_every_rpc_is_counted_under_the_code_its_client_got(served, wait, pages_back):
    server, port = served
    with Client("127.0.0.1", port, token=TOKEN) as c:
        before = counted(server, "GenerateUnary", "OK")
        c.generate_unary("Hi", SamplingParams(max_tokens=2), timeout=60)
        expect(server, wait, "GenerateUnary", "OK", before)

        before = counted(server, "Generate", "DEADLINE_EXCEEDED")
        assert failure(lambda: c.generate("Hi", LONG, timeout=0.5)) == \
            grpc.StatusCode.DEADLINE_EXCEEDED
        expect(server, wait, "Generate", "DEADLINE_EXCEEDED", before)

        before = counted(server, "GenerateUnary", "DEADLINE_EXCEEDED")
        # Short deadlines, each cut while the request runs. (A deadline that passes before
        # gRPC even dispatches the call reaches no handler, and is not counted.) The client
        # cancels as its deadline passes, a few ms before the server's copy of it runs out.
        for timeout in (0.3, 1.0, 1.0, 1.0, 1.0):
            assert failure(lambda t=timeout: c.generate_unary("Hi", LONG, timeout=t)) == \
                grpc.StatusCode.DEADLINE_EXCEEDED
        expect(server, wait, "GenerateUnary", "DEADLINE_EXCEEDED", before, n=5)

        before = counted(server, "Generate", "CANCELLED")
        stream = c.generate("Hi", LONG)
        next(stream)
        stream.cancel()
        expect(server, wait, "Generate", "CANCELLED", before)

        before = counted(server, "GenerateUnary", "RESOURCE_EXHAUSTED")
        assert failure(lambda: c.generate_unary("x" * (LIMIT + 10), LONG, timeout=30)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED  # the request is over the limit
        big = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, logprobs=20)
        latencies = latency_count(server)
        assert failure(lambda: c.generate_unary("Hi", big, timeout=60)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED  # the response would be
        expect(server, wait, "GenerateUnary", "RESOURCE_EXHAUSTED", before, n=2)
        assert latency_count(server) == latencies  # not a request that finished normally
        c.generate_unary("Hi", SamplingParams(max_tokens=2), timeout=60)
        assert latency_count(server) == latencies + 1
        pages_back(c, 0)

    with Client("127.0.0.1", port) as no_token:
        before = counted(server, "Generate", "UNAUTHENTICATED")
        assert failure(lambda: no_token.generate("Hi", LONG, timeout=30)) == \
            grpc.StatusCode.UNAUTHENTICATED
        expect(server, wait, "Generate", "UNAUTHENTICATED", before)


class _Context:
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_the_code_counted_is_the_verdict_when_it_was_made():
    """gRPC reports an RPC done only after the client's close, which may come after the
    deadline: an answer sent in time still counts as its own code."""
    from jaxserve.server.servicer import _final_code

    ok, internal = grpc.StatusCode.OK, grpc.StatusCode.INTERNAL
    late = _Context(-0.5)  # the deadline has passed when the done callback runs
    assert _final_code([(ok, 0.01)], late) is ok
    assert _final_code([(internal, 0.2)], late) is internal
    assert _final_code([(ok, -0.001)], _Context(5.0)) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_code([(ok, None)], _Context(None)) is ok  # no deadline
    # cancelled, no verdict: a cancel near or after the deadline is the deadline's
    assert _final_code([], _Context(0.05)) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_code([], late) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_code([], _Context(5.0)) is grpc.StatusCode.CANCELLED
    assert _final_code([], _Context(None)) is grpc.StatusCode.CANCELLED


def test_the_metrics_endpoint_binds_an_ipv6_host_given_in_brackets():
    """server.host may be "[::1]" (the form a URL takes); the HTTP socket takes it bare."""
    import socket
    import urllib.request

    from jaxserve.server.metrics import ServerMetrics

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    metrics = ServerMetrics()
    assert metrics.start_http("[::1]", port) == port
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"jaxserve_requests_total" in r.read()
    finally:
        metrics.stop_http()


def test_the_collectors_pauses_are_observed_while_the_endpoint_serves(unused_port):
    import gc
    import urllib.request

    from jaxserve.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    count = lambda g: metrics.registry.get_sample_value(  # noqa: E731
        "jaxserve_gc_pause_seconds_count", {"generation": str(g)})
    gc.collect(2)  # no endpoint yet: not observed
    assert count(2) == 0
    port = metrics.start_http("127.0.0.1", unused_port())
    try:
        gc.collect(2)
        gc.collect(2)
        gc.collect(1)
        assert count(2) >= 2 and count(1) >= 1  # (the collector may also run on its own)
        assert metrics.registry.get_sample_value("jaxserve_gc_pause_seconds_sum",
                                                 {"generation": "2"}) > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b'jaxserve_gc_pause_seconds_count{generation="2"}' in r.read()
    finally:
        metrics.stop_http()
    seen = count(2)
    gc.collect(2)  # stopped: no longer observed, the callback gone
    assert count(2) == seen and metrics._gc_watch._callback not in gc.callbacks
