"""A full waiting queue answers RESOURCE_EXHAUSTED at once; so does a message over the
configured size. One sequence runs at a time here, and two may wait."""

import grpc
import pytest

from jaxserve.engine.request import SamplingParams
from jaxserve.server.client import Client

LONG = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def client(server_config, start_server):
    config = server_config.replace(scheduler__max_num_seqs=1, scheduler__max_waiting=2,
                                   server__max_message_bytes=MAX_MESSAGE)
    with start_server(config) as (_, port), Client("127.0.0.1", port) as c:
        yield c


def test_full_waiting_queue_is_resource_exhausted(client, wait, pages_back):
    running = client.generate("The first one runs", LONG)
    next(running)
    waiting = [client.generate(f"Number {i} waits", LONG) for i in range(2)]
    info = wait(lambda: (i := client.model_info()).num_waiting == 2 and i, 30,
                what="two waiting requests")
    assert info.num_running == 1
    with pytest.raises(grpc.RpcError) as e:
        client.generate_unary("One too many", LONG, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_waiting=2 beyond the 1 running slots" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("Streaming, one too many", LONG, timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in (running, *waiting):
        call.cancel()
    pages_back(client, 0)
    # room again
    reply = client.generate_unary("After", SamplingParams(max_tokens=2), timeout=60)
    assert reply.usage.completion_tokens == 2


def test_a_burst_may_fill_the_free_running_slots_besides_the_waiting_queue(
        server_config, start_server, pages_back):
    """Four free slots and room for two to wait: six at once are all taken (the waiting
    bound alone used to refuse all but three)."""
    from concurrent.futures import ThreadPoolExecutor

    config = server_config.replace(scheduler__max_num_seqs=4, scheduler__max_waiting=2)
    with start_server(config) as (_, port), Client("127.0.0.1", port) as c:
        short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda i: c.generate_unary(f"burst {i}", short, timeout=120),
                                    range(6)))
        assert [r.usage.completion_tokens for r in replies] == [3] * 6
        pages_back(c, 0)


def test_message_over_the_limit_is_resource_exhausted(client):
    with pytest.raises(grpc.RpcError) as e:
        client.generate_unary("x" * (MAX_MESSAGE + 1), SamplingParams(max_tokens=1),
                              timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancelled_requests_free_their_seats_before_the_engine_steps_again(demo_config,
                                                                           demo_model):
    """Requests cancelled while a step is under way still count against the queue in the
    engine's figures until that step ends: admission counts them gone at once."""
    import asyncio
    import threading

    from jaxserve.engine.engine import Engine
    from jaxserve.server.engine_loop import EngineLoop, QueueFullError

    config = demo_config.replace(scheduler__max_num_seqs=1)
    engine = Engine(config, demo_model.model_config, demo_model.params, demo_model.tokenizer,
                    demo_model.mesh)
    step, steps, release = engine.step, [], threading.Event()

    def held_step():  # the second step stays under way until released
        steps.append(1)
        if len(steps) == 2:
            release.wait(60)
        return step()

    engine.step = held_step
    loop = EngineLoop(engine, max_waiting=2)
    loop.start(warm_up=False)
    aio = asyncio.new_event_loop()
    ids = engine.inputs.encode("Count to ten")
    try:
        streams = [loop.submit(ids, LONG, request_id=f"r{i}", priority=0, loop=aio)
                   for i in range(3)]  # one runs, two wait
        while len(steps) < 2:
            threading.Event().wait(0.01)
        assert loop.stats.num_running == 1 and loop.num_waiting == 2
        with pytest.raises(QueueFullError):
            loop.submit(ids, LONG, request_id="full", priority=0, loop=aio)
        for s in streams:
            loop.abort(s)
        fresh = [loop.submit(ids, LONG, request_id=f"n{i}", priority=0, loop=aio)
                 for i in range(3)]  # the seats of the three cancelled
        with pytest.raises(QueueFullError):
            loop.submit(ids, LONG, request_id="full", priority=0, loop=aio)
        for s in fresh:
            loop.abort(s)
    finally:
        release.set()
        loop.stop(60.0)
        aio.close()


class _OneSlotEngine:
    """A stand-in engine with one running slot, stepped by hand: a waiting request starts
    at one step and finishes at the next."""

    def __init__(self):
        import threading
        import types

        self.config = types.SimpleNamespace(scheduler=types.SimpleNamespace(max_num_seqs=1))
        self.runner = types.SimpleNamespace(num_shards=1)
        self.waiting, self.running = [], []
        self.during_step = None
        self.gate = threading.Semaphore(0)

    def stats(self):
        from jaxserve.engine.engine import EngineStats

        return EngineStats(len(self.waiting), len(self.running), 0, 0, 0, 0, 0)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def has_request(self, request_id):
        return request_id in self.waiting or request_id in self.running

    def add_request(self, ids, params, request_id, priority):
        self.waiting.append(request_id)

    def abort(self, request_id):
        for queue in (self.waiting, self.running):
            if request_id in queue:
                queue.remove(request_id)

    def step(self):
        from jaxserve.engine.request import FinishReason, RequestOutput

        self.gate.acquire()
        if self.during_step:
            self.during_step()
            self.during_step = None
        if self.running:
            return [RequestOutput(self.running.pop(0), (1,), "x", True, FinishReason.LENGTH)]
        if self.waiting:
            self.running.append(self.waiting.pop(0))
        return []


def test_a_cancel_of_a_request_its_step_finished_frees_one_seat_not_two():
    """The client cancels a request during the step that finishes it: once that step's
    figures are in, its seat is free once (the abort no longer counts as a second one)."""
    import asyncio
    import threading

    from jaxserve.server.engine_loop import EngineLoop, QueueFullError

    engine, aio, answers, done = _OneSlotEngine(), asyncio.new_event_loop(), [], threading.Event()
    params = SamplingParams(max_tokens=5)

    def observer(stats, outputs, num_waiting):  # right after the step that finished R
        if outputs and not answers:
            for name in ("X", "Y"):
                try:
                    loop.submit([1], params, request_id=name, priority=0, loop=aio)
                    answers.append(f"{name} admitted")
                except QueueFullError:
                    answers.append(f"{name} refused")
            done.set()

    loop = EngineLoop(engine, max_waiting=0, observer=observer)  # one seat, no waiting
    loop.start(warm_up=False)
    try:
        first = loop.submit([1], params, request_id="R", priority=0, loop=aio)
        engine.gate.release()  # R starts running
        while not engine.running:
            threading.Event().wait(0.01)
        engine.during_step = lambda: loop.abort(first)  # cancelled as its last step runs
        engine.gate.release()
        assert done.wait(10)
        assert answers == ["X admitted", "Y refused"]
    finally:
        for _ in range(20):
            engine.gate.release()
        loop.stop(10.0)
        aio.close()
