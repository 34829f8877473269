"""Request lifecycle over gRPC: cancellation, deadlines and disconnects free every page,
a failing request ends with INTERNAL while others go on, and a bounded soak with random
cancels leaves no leaked pages."""

import asyncio
import random
import threading
import time

import grpc
import pytest

from jaxserve.engine.request import SamplingParams
from jaxserve.server.client import AsyncClient, Client
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.protocol import make_request

LONG = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(server_config, start_server):
    with start_server(server_config) as (thread, port):
        yield thread, port


@pytest.fixture(scope="module")
def client(served):
    with Client("127.0.0.1", served[1]) as c:
        yield c


@pytest.fixture
def baseline(client, wait):
    """Pages in use before the test, once nothing runs or waits (prefix-cached pages
    count as free, so this is 0 unless something leaked)."""
    info = wait(lambda: (i := client.model_info()).num_running == 0 and i.num_waiting == 0
                and i, 60, what="an idle engine")
    assert info.kv_pages_used == 0
    return info.kv_pages_used


def test_cancel_frees_pages(client, baseline, pages_back):
    calls = [client.generate(f"Story {i}: once upon a time", LONG) for i in range(4)]
    for call in calls:
        next(call)  # each is running and holds pages
    info = client.model_info()
    assert info.num_running == 4 and info.kv_pages_used > baseline
    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    pages_back(client, baseline)


def test_deadline_frees_pages(client, baseline, pages_back):
    with pytest.raises(grpc.RpcError) as e:
        client.generate_unary("Count to a thousand:", LONG, timeout=1.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("Count to a million:", LONG, timeout=1.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    pages_back(client, baseline)


def test_disconnect_frees_pages(served, client, baseline, pages_back):
    other = Client("127.0.0.1", served[1])
    call = other.generate("Tell me everything:", LONG)
    next(call)
    assert client.model_info().num_running == 1
    other.close()  # the connection goes away mid-stream
    pages_back(client, baseline)


def test_failing_request_gets_internal_others_go_on(served, client, baseline, pages_back,
                                                    monkeypatch):
    """A fault injected into one request's token processing (inside Engine.step) ends that
    request with INTERNAL and its message; a request beside it completes."""
    engine = served[0].server.engine
    append = engine._append

    def faulty(tracked, token, logprob):
        if tracked.request.request_id.startswith("boom#"):
            raise RuntimeError("injected fault")
        return append(tracked, token, logprob)

    monkeypatch.setattr(engine, "_append", faulty)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    good = client.generate("A good request", params)
    bad = client.generate("A bad request", params, request_id="boom")
    with pytest.raises(grpc.RpcError) as e:
        list(bad)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "injected fault" in e.value.details()
    assert sum(len(c.token_ids) for c in good) == 6
    monkeypatch.undo()
    pages_back(client, baseline)
    assert len(list(client.generate("Still serving", params))) > 0


def test_step_fault_fails_its_requests_not_later_arrivals(served, client, baseline,
                                                          pages_back, monkeypatch):
    """A step that fails as a whole ends the requests it held with INTERNAL; a request
    submitted while that step ran was not in it: it runs to its end, and nothing is left
    running behind the clients' backs."""
    engine = served[0].server.engine
    execute = engine.runner.execute
    in_step, release = threading.Event(), threading.Event()

    def faulty(*args, **kwargs):
        monkeypatch.setattr(engine.runner, "execute", execute)  # only this step fails
        in_step.set()
        release.wait(30)
        raise RuntimeError("injected step fault")

    monkeypatch.setattr(engine.runner, "execute", faulty)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = client.generate("In the failing step", params)
    assert in_step.wait(60)
    loop = served[0].server.engine_loop
    before = loop.num_waiting  # (the engine thread is held in the step: nothing leaves)
    late = client.generate("Submitted during it", params)
    for _ in range(600):  # the late submission is in the loop's inbox before the step fails
        if loop.num_waiting > before:
            break
        time.sleep(0.01)
    assert loop.num_waiting == before + 1
    release.set()
    with pytest.raises(grpc.RpcError) as e:
        list(first)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "injected step fault" in e.value.details()
    assert sum(len(c.token_ids) for c in late) == 4
    pages_back(client, baseline)


def test_soak_with_random_cancels_leaks_nothing(served, client, baseline, pages_back):
    """200 requests, 24 at a time; about a third cancelled at a random point, some with
    short deadlines. Bounded: the whole run must finish within 150 s."""
    rng = random.Random(0)
    plans = [(rng.randint(1, 5), rng.random(), rng.uniform(0.0, 0.5)) for _ in range(200)]
    outcomes: dict[str, int] = {}

    async def one(c, limit, i, max_tokens, dice, delay):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        timeout = 0.3 + delay if 0.15 < dice < 0.25 else None
        async with limit:
            call = c.generate(make_request(f"Soak {i}: the", params=params), timeout=timeout)
            try:
                if dice < 0.15:
                    await asyncio.sleep(delay)
                    call.cancel()
                n = 0
                async for chunk in call:
                    n += len(chunk.token_ids)
                assert n == max_tokens
                code = "OK"
            except asyncio.CancelledError:
                code = "CANCELLED"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
        outcomes[code] = outcomes.get(code, 0) + 1

    async def run():
        limit = asyncio.Semaphore(24)
        async with AsyncClient("127.0.0.1", served[1]) as c:
            await asyncio.wait_for(asyncio.gather(*(one(c, limit, i, *p)
                                                    for i, p in enumerate(plans))), 150)

    asyncio.run(run())
    assert sum(outcomes.values()) == 200
    assert set(outcomes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, outcomes
    assert outcomes["OK"] > 100
    pages_back(client, baseline)
    final = client.generate_unary("After the soak", SamplingParams(max_tokens=2))
    assert final.finish_reason != pb.FINISH_REASON_UNSPECIFIED
