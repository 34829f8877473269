"""The gRPC server: InferenceService, health, reflection, auth, TLS, metrics, draining.

Lifecycle: `start()` binds and serves with health NOT_SERVING; `warm_up()` compiles every
bucket on the engine thread, then health turns SERVING; `shutdown(grace)` turns health
NOT_SERVING, refuses new generations (UNAVAILABLE), lets running ones finish for up to
`grace` seconds, cuts the rest (UNAVAILABLE) and stops.

`serve()` is the `jaxserve serve` main (SIGTERM/SIGINT drain and exit 0); `ServerThread`
runs a server on its own event loop thread, for tests and for embedding.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jax
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.config import Config
from jaxserve.engine.engine import Engine
from jaxserve.errors import JaxserveError
from jaxserve.loader import LoadedModel
from jaxserve.server.engine_loop import EngineLoop
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import host_port
from jaxserve.server.security import (
    BearerTokenInterceptor,
    check_bind_security,
    server_credentials,
)
from jaxserve.server.servicer import SERVICE_NAME, InferenceServicer, add_to_server

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SHUTDOWN_MESSAGE = "the server is shutting down"
EXIT_PEER_LOST = 3  # a peer process was lost: the orchestrator should restart the group


class InferenceServer:
    """One engine behind one gRPC server; takes an already loaded model."""

    def __init__(self, config: Config, model: LoadedModel, *, insecure: bool = False):
        check_bind_security(config.server, insecure)
        self._credentials = server_credentials(config.server)  # fail before any work
        self.config = config
        self.engine = Engine(config, model.model_config, model.params, model.tokenizer,
                             model.mesh)
        self.metrics = ServerMetrics()
        self.multi_process = jax.process_count() > 1
        self.engine_loop = EngineLoop(self.engine, max_waiting=config.scheduler.max_waiting,
                                      observer=self.metrics.observe_engine,
                                      on_fatal=self._fault_threadsafe,
                                      multi_process=self.multi_process)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="jaxserve-tokenize")
        self._server: grpc.aio.Server | None = None
        self.fault: str | None = None  # why the server gave up (a lost peer process)
        self.failed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False  # the followers are let go: the watchdog stops

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until warm_up); returns the port."""
        s = self.config.server
        self._loop = asyncio.get_running_loop()
        self.failed = asyncio.Event()
        if self.multi_process:
            self._spawn(self._watchdog())
        await self._set_health(NOT_SERVING)
        interceptors = []
        if s.auth_token:
            interceptors.append(BearerTokenInterceptor(
                s.auth_token,
                lambda method: self.metrics.count(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")))
        server = grpc.aio.server(interceptors=interceptors, options=[
            # Twice the limit reaches the handlers, which refuse (and count) what is over it;
            # beyond that the transport refuses alone.
            ("grpc.max_receive_message_length", 2 * s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        add_to_server(InferenceServicer(self.config, self.engine, self.engine_loop,
                                        self.metrics, self._executor), server,
                      s.max_message_bytes)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = host_port(s.host, s.port)
        try:
            if self._credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self._credentials)
        except RuntimeError as e:
            raise JaxserveError(f"cannot bind {address}: {e}") from None
        if not port:
            raise JaxserveError(f"cannot bind {address}")
        await server.start()
        self._server, self.port = server, port
        try:
            self.metrics_port = self.metrics.start_http(s.host, s.metrics_port)
        except OSError as e:
            await server.stop(None)
            where = host_port(s.host, s.metrics_port)
            raise JaxserveError(f"server.metrics_port: cannot bind {where}: "
                                f"{e.strerror or e}") from None
        return port

    async def warm_up(self, progress: bool = False) -> None:
        """Start the engine thread, compile every bucket on it, then report SERVING."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()

        def on_ready(error):
            loop.call_soon_threadsafe(
                lambda: ready.done() or (ready.set_exception(error) if error
                                         else ready.set_result(None)))

        self.engine_loop.start(warm_up=True, progress=progress, on_ready=on_ready)
        await ready
        await self._set_health(SERVING)

    # ----- faults: a lost peer process ----------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fault_threadsafe(self, message: str) -> None:
        self._loop.call_soon_threadsafe(self._fault, message)

    def _fault(self, message: str) -> None:
        """NOT_SERVING, every request cut with UNAVAILABLE, and `failed` set for serve()."""
        if self.fault is not None:
            return
        self.fault = message
        log.error("giving up: %s", message)
        self.engine_loop.stop_admitting()
        self.engine_loop.cut_all(f"{message}; the server is going down, retry once it is "
                                 "back")
        self._spawn(self._set_health(NOT_SERVING))
        self.failed.set()

    async def _watchdog(self) -> None:
        """A step (or idle ping) that does not return means a peer process is hung or gone;
        a peer whose step channel closed is gone (seen at once, warm-up included)."""
        limit = self.config.distributed.step_timeout_s
        channel = self.engine.runner.channel
        while self.fault is None:
            await asyncio.sleep(min(1.0, limit / 4))
            if self._closing:  # the followers leave once the engine closes: no fault
                break
            lost = channel.lost_peers() if channel is not None else []
            if lost:
                self._fault(f"process(es) {lost} closed the step channel: they stopped")
                break
            busy = self.engine_loop.busy_for()
            if busy > limit:
                self._fault(f"a step across processes has not finished in {busy:.0f} s "
                            f"(distributed.step_timeout_s={limit:g}): a peer process is "
                            "lost or hung")

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, no new generations, `grace` seconds to finish, then stop."""
        grace = self.config.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.engine_loop.stop_admitting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.engine_loop.num_active and loop.time() < deadline:
            await asyncio.sleep(0.02)
        cut = self.engine_loop.cut_all(f"{SHUTDOWN_MESSAGE}; the request was cut after the "
                                       f"{grace:g} s grace period")
        if cut:
            log.warning("cut %d requests still running after %g s", cut, grace)
        if self._server is not None:
            await self._server.stop(1.0)  # lets the cut handlers send their status
        await loop.run_in_executor(None, self.engine_loop.stop, 60.0)
        self._closing = True
        await loop.run_in_executor(None, self.engine.close)  # let the followers go
        self.metrics.stop_http()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def abandon(self) -> None:
        """After a fault: stop listening; the engine thread may be stuck in a collective, so
        it is left behind (the process is about to exit)."""
        await asyncio.sleep(1.0)  # health checks and retries see NOT_SERVING / UNAVAILABLE
        if self._server is not None:
            await self._server.stop(0.5)
        self.metrics.stop_http()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


class ServerThread:
    """An InferenceServer on its own asyncio event loop thread."""

    def __init__(self, server: InferenceServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jaxserve-grpc",
                                        daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, warm_up: bool = True) -> int:
        port = self.run(self.server.start())
        if warm_up:
            self.run(self.server.warm_up())
        return port

    def stop(self, grace: float = 0.0) -> None:
        """Shut the server down (draining for `grace` seconds), then end the thread."""
        try:
            self.run(self.server.shutdown(grace))
        finally:
            self.close()

    def close(self) -> None:
        """End the event loop thread (after `server.shutdown()` ran on it)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def serve(config: Config, model: LoadedModel, *, insecure: bool = False,
                progress: bool = True) -> int:
    """Serve until SIGTERM or SIGINT, then drain for server.grace_period_s; returns the exit
    code (EXIT_PEER_LOST when a peer process was lost)."""
    server = InferenceServer(config, model, insecure=insecure)
    port = await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the line that says it is up
        loop.add_signal_handler(sig, stop.set)
    s = config.server
    metrics = f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"jaxserve: listening on {host_port(s.host, port)} "
          f"({'TLS' if s.tls_cert else 'plaintext'}{metrics}); warming up", flush=True)
    warm_started = time.monotonic()
    warm = asyncio.create_task(server.warm_up(progress))
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(server.failed.wait())
    await asyncio.wait({warm, stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if warm.done() and server.fault is None:
            warm.result()  # a failed warm-up ends the server with its error
            print(f"jaxserve: {len(server.engine.runner.step_programs())} step programs ready in "
                  f"{time.monotonic() - warm_started:.1f} s", flush=True)
            print(f"jaxserve: serving {config.model.name} (health SERVING)", flush=True)
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        if server.fault is not None:
            print(f"jaxserve: {server.fault}; exiting", file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
        print(f"jaxserve: draining (up to {s.grace_period_s:g} s)", file=sys.stderr,
              flush=True)
    finally:
        warm.cancel()
        failed.cancel()
        if server.fault is None:
            await server.shutdown()
        else:
            await server.abandon()
    print("jaxserve: stopped", file=sys.stderr, flush=True)
    return 0
