"""Server test helpers: real servers on loopback ports built from the session's demo model,
real gRPC clients. Each module starts its own server once (module-scoped fixtures)."""

import contextlib
import time

import pytest

from jaxserve.server.client import Client
from jaxserve.server.grpc_server import InferenceServer, ServerThread


@pytest.fixture(scope="session")
def server_config(demo_config):
    """The demo config on a free loopback port, no metrics endpoint, short drain."""
    return demo_config.replace(server__host="127.0.0.1", server__port=0,
                               server__metrics_port=None, server__grace_period_s=5.0)


@pytest.fixture(scope="session")
def start_server(demo_model):
    """`with start_server(config) as (thread, port):` serves the demo model, warmed up."""
    @contextlib.contextmanager
    def start(config, warm_up=True):
        thread = ServerThread(InferenceServer(config, demo_model))
        try:
            port = thread.start(warm_up=warm_up)
            yield thread, port
        finally:
            thread.stop(grace=0.0)
    return start


def wait_until(predicate, timeout=60.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait():
    return wait_until


@pytest.fixture(scope="session")
def pages_back(wait):
    """`pages_back(client, baseline)`: wait until the engine holds `baseline` pages again,
    runs nothing and has nothing waiting; returns the final ModelInfo."""
    def check(client: Client, baseline: int, timeout: float = 60.0):
        last = []

        def idle():
            info = client.model_info(timeout=10)
            last[:] = [info]
            ok = (info.kv_pages_used == baseline and info.num_running == 0
                  and info.num_waiting == 0)
            return info if ok else None
        try:
            return wait(idle, timeout, what=f"KV pages back to {baseline} and no requests")
        except AssertionError as e:
            i = last[0]
            raise AssertionError(f"{e}; last: pages used {i.kv_pages_used}, running "
                                 f"{i.num_running}, waiting {i.num_waiting}") from None
    return check
