"""Start-up's objects out of the cyclic GC (engine/heap.py): what is frozen, what is still
collected, and that the serving paths (the engine loop, the offline LLM) freeze and thaw."""

import asyncio
import gc
import threading
import weakref

import pytest

from jaxserve.engine.heap import freeze_startup, thaw


class _Node:
    """A GC-tracked object in a reference cycle with itself."""

    def __init__(self):
        self.me = self


def _tracked(obj) -> bool:
    """Whether the collector's generations hold obj (a frozen object is in none of them)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _thawed():
    thaw()
    yield
    thaw()


def test_freeze_collects_start_up_garbage_and_freezes_what_lives():
    dead = weakref.ref(_Node())  # unreachable already, kept alive only by its cycle
    alive = _Node()
    assert dead() is not None and _tracked(alive)
    assert freeze_startup() > 0
    assert dead() is None  # collected before the freeze, not frozen with the rest
    assert not _tracked(alive) and gc.get_freeze_count() > 0
    thaw()
    assert _tracked(alive) and gc.get_freeze_count() == 0


def test_a_frozen_cycle_that_dies_is_freed_by_the_next_freeze():
    node = _Node()
    freeze_startup()
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is not None  # frozen: no collection looks at it
    freeze_startup()  # thaws first, so the dead cycle is collected
    assert ref() is None


def test_the_offline_llm_freezes_its_engine(demo_config):
    from jaxserve.engine.llm import LLM

    llm = LLM(demo_config, progress=False)
    assert gc.get_freeze_count() > 0
    assert not _tracked(llm.engine) and not _tracked(llm.engine.runner)


def test_the_engine_loop_freezes_once_ready_and_thaws_when_it_stops(demo_config, demo_model):
    from jaxserve.engine.engine import Engine
    from jaxserve.engine.request import SamplingParams
    from jaxserve.server.engine_loop import EngineLoop

    engine = Engine(demo_config, demo_model.model_config, demo_model.params,
                    demo_model.tokenizer, demo_model.mesh)
    assert _tracked(engine)
    ready, errors = threading.Event(), []
    loop = EngineLoop(engine, max_waiting=4)
    loop.start(warm_up=False, on_ready=lambda error: (errors.append(error), ready.set()))
    aio = asyncio.new_event_loop()
    try:
        assert ready.wait(60) and errors == [None]
        assert not _tracked(engine) and not _tracked(engine.scheduler)
        # objects made while serving stay with the collector
        stream = loop.submit(engine.inputs.encode("Hello"), SamplingParams(max_tokens=2),
                             request_id="r", priority=0, loop=aio)
        assert _tracked(stream)
        loop.abort(stream)
    finally:
        loop.stop(60.0)
        aio.close()
    assert gc.get_freeze_count() == 0 and _tracked(engine)


def test_the_pause_watch_reports_each_collection_while_on():
    from jaxserve.engine.heap import PauseWatch

    seen = []
    with PauseWatch(lambda generation, seconds: seen.append((generation, seconds))) as watch:
        gc.collect(2)
    gc.collect(2)  # after the context: not reported
    assert [g for g, _ in seen if g == 2] == [2] and all(s >= 0 for _, s in seen)
    assert watch._callback not in gc.callbacks
