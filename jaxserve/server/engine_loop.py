"""The engine thread: while the server runs, the only caller of Engine methods.

Handlers on the asyncio event loop never touch the engine. They `submit()` a tokenized,
validated request and get a RequestStream back; they `abort()` it when the client goes
away. Both only take a lock for a moment. The engine thread takes new submissions and
aborts between steps, calls `engine.step()`, and hands each step's outputs to the streams
with `loop.call_soon_threadsafe`; with nothing to do it sleeps on a condition variable.

Over several processes a failed step means a peer is gone: the loop stops and reports it
(`on_fatal`) instead of serving on. While idle it pings the peers every PING_INTERVAL_S, and
`busy_for()` lets a watchdog see a step (or ping) that never returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable

from jaxserve.engine.engine import Engine, EngineStats
from jaxserve.engine.heap import freeze_startup, thaw
from jaxserve.engine.request import FinishReason, RequestOutput, SamplingParams
from jaxserve.errors import InvalidRequestError

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue holds `max_waiting` requests already."""


class NotAdmittingError(Exception):
    """The server is draining or stopped and takes no new requests."""


class FailureKind(enum.Enum):
    INVALID = "invalid"  # the engine refused the request (InvalidRequestError)
    INTERNAL = "internal"  # the request failed inside the engine
    UNAVAILABLE = "unavailable"  # the server cut the request while shutting down


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    field: str | None = None


class RequestFailedError(Exception):
    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


class RequestStream:
    """One request's outputs, delivered on the event loop of the handler that submitted it."""

    def __init__(self, request_id: str, engine_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id  # the client's
        self.engine_id = engine_id  # unique per submission, so a client may reuse its ids
        self.finished = False  # the consumer has seen the last output or a failure
        self._loop = loop
        self._queue: asyncio.Queue[list[RequestOutput] | Failure] = asyncio.Queue()

    def _deliver(self, item: list[RequestOutput] | Failure) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self) -> list[RequestOutput]:
        """The outputs that arrived since the last call (waiting for at least one); raises
        RequestFailedError when the request failed. The last output has `finished` set."""
        outputs: list[RequestOutput] = []
        item = await self._queue.get()
        while True:
            if isinstance(item, Failure):
                self.finished = True
                raise RequestFailedError(item)
            outputs.extend(item)
            if self._queue.empty() or outputs[-1].finished:
                break
            item = self._queue.get_nowait()
        if outputs[-1].finished:
            self.finished = True
        if outputs[-1].finish_reason is FinishReason.ERROR:
            raise RequestFailedError(Failure(FailureKind.INTERNAL,
                                             outputs[-1].error or "the request failed"))
        return outputs


@dataclasses.dataclass(frozen=True)
class _Submission:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    priority: int


Observer = Callable[[EngineStats, list[RequestOutput], int], None]
PING_INTERVAL_S = 2.0
_IDLE = object()  # _take_work's answer when an idle multi-process loop should ping


class EngineLoop:
    def __init__(self, engine: Engine, *, max_waiting: int, observer: Observer | None = None,
                 on_fatal: Callable[[str], None] | None = None, multi_process: bool = False):
        self.engine = engine
        self.max_waiting = max_waiting
        self._observer = observer  # (stats, outputs, num_waiting), on the engine thread
        self._on_fatal = on_fatal  # (message), on the engine thread
        self._multi_process = multi_process
        self._busy_since: float | None = None  # when the step or ping under way began
        # Sequences that can run at once: a burst may fill them besides the waiting bound.
        self._slots = engine.config.scheduler.max_num_seqs * engine.runner.num_shards
        self._failed = False  # a fault ended the loop (see _fatal)
        self._cv = threading.Condition()
        self._inbox: list[_Submission] = []
        self._aborts: list[str] = []  # engine ids
        self._streams: dict[str, RequestStream] = {}  # engine id -> stream
        self._client_ids: set[str] = set()
        self._engine_waiting = 0  # the engine's waiting queue, as of its last step
        self._admitting = True
        self._stopping = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.stats: EngineStats = engine.stats()  # replaced after every step

    # ----- called from other threads -------------------------------------------------------
    def start(self, *, warm_up: bool = True, progress: bool = False,
              on_ready: Callable[[BaseException | None], None] | None = None) -> None:
        """Start the engine thread; it warms the engine up first, then calls on_ready."""
        self._thread = threading.Thread(target=self._run, args=(warm_up, progress, on_ready),
                                        name="jaxserve-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str,
               priority: int, loop: asyncio.AbstractEventLoop) -> RequestStream:
        with self._cv:
            if not self._admitting:
                raise NotAdmittingError("the server is shutting down")
            if request_id in self._client_ids:
                raise InvalidRequestError("request_id", f"{request_id!r} is already running")
            # Aborts the engine has not applied yet (a step is under way) free their seats
            # now: a burst of cancels must not leave the queue looking full for a step.
            waiting = len(self._inbox) + self._engine_waiting
            held = waiting + self.stats.num_running - len(self._aborts)
            if held >= self.max_waiting + self._slots:
                raise QueueFullError(f"{waiting} requests are waiting or starting "
                                     f"(scheduler.max_waiting={self.max_waiting} beyond the "
                                     f"{self._slots} running slots)")
            stream = RequestStream(request_id, f"{request_id}#{next(self._ids)}", loop)
            self._streams[stream.engine_id] = stream
            self._client_ids.add(request_id)
            self._inbox.append(_Submission(stream, prompt_ids, params, priority))
            self._cv.notify()
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Drop a request whose client went away; the engine frees its pages next step."""
        with self._cv:
            if self._streams.pop(stream.engine_id, None) is None:
                return  # already finished
            self._client_ids.discard(stream.request_id)
            kept = [s for s in self._inbox if s.stream is not stream]
            if len(kept) == len(self._inbox):
                self._aborts.append(stream.engine_id)
            self._inbox = kept
            self._cv.notify()

    def stop_admitting(self) -> None:
        with self._cv:
            self._admitting = False

    def cut_all(self, message: str) -> int:
        """End every request now with an UNAVAILABLE failure; returns how many."""
        with self._cv:
            streams = list(self._streams.values())
            queued = {s.stream.engine_id for s in self._inbox}
            self._aborts.extend(s.engine_id for s in streams if s.engine_id not in queued)
            self._inbox.clear()
            self._streams.clear()
            self._client_ids.clear()
            self._cv.notify()
        for s in streams:
            s._deliver(Failure(FailureKind.UNAVAILABLE, message))
        return len(streams)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after its current step (requests still running are dropped)."""
        with self._cv:
            self._admitting = False
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def busy_for(self) -> float:
        """Seconds the step (or ping) under way has taken so far; 0 when none is."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def num_waiting(self) -> int:
        with self._cv:
            return len(self._inbox) + self._engine_waiting

    @property
    def num_active(self) -> int:
        """Requests submitted whose streams have not ended."""
        with self._cv:
            return len(self._streams)

    # ----- the engine thread ---------------------------------------------------------------
    def _run(self, warm_up: bool, progress: bool, on_ready) -> None:
        error = None
        try:
            # A stop (SIGTERM while compiling) ends warm-up between programs.
            if warm_up and not self.engine.warm_up(progress, stop=lambda: self._stopping):
                log.warning("warm-up stopped: the server is shutting down")
        except Exception as e:  # reported to the server, which refuses to serve
            log.exception("engine warm-up failed")
            error = e
        if error is None:  # the figures as warm-up left them (its compilations, every
            stats = self.engine.stats()  # page free), before any request is served
            with self._cv:
                self.stats = stats
            if self._observer is not None:
                self._observer(stats, [], 0)
            freeze_startup()  # no collection walks start-up's objects while serving
        if on_ready is not None:
            on_ready(error)
        try:
            while (work := self._take_work()) is not None:
                if work is _IDLE:
                    self._ping()  # outside the lock: submit() never waits on a peer
                else:
                    self._iterate(*work)
                if self._failed:
                    return  # the server reports the fault and exits; no step can finish now
        finally:
            thaw()

    def _take_work(self) -> tuple[list[_Submission], list[str]] | object | None:
        """Sleep until there is something to do; _IDLE when several processes should check
        on each other; None once stopped (and wound down)."""
        with self._cv:
            while not (self._inbox or self._aborts or self._stopping
                       or self.engine.has_unfinished()):
                if not self._multi_process:
                    self._cv.wait()
                elif not self._cv.wait(PING_INTERVAL_S):
                    return _IDLE
            if self._stopping:
                leftover = [*self._aborts, *self._streams]  # unknown ids are no-ops
            else:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                self._engine_waiting += len(inbox)
                return inbox, aborts
        self._wind_down(leftover)
        return None

    def _iterate(self, inbox: list[_Submission], aborts: list[str]) -> None:
        for engine_id in aborts:
            self.engine.abort(engine_id)
        for sub in inbox:
            self._add(sub)
        outputs = self._step() if self.engine.has_unfinished() else []
        # Figures first, outputs second: a client that saw its last token and then asks
        # for the engine's figures sees its pages already freed.
        stats = self.engine.stats()
        with self._cv:
            self._engine_waiting = stats.num_waiting
            self.stats = stats
            # aborts of requests this step finished no longer hold a seat in these figures
            self._aborts = [a for a in self._aborts if self.engine.has_request(a)]
            num_waiting = len(self._inbox) + stats.num_waiting
        self._route(outputs)
        if self._observer is not None:
            self._observer(stats, outputs, num_waiting)

    def _wind_down(self, aborts: list[str], max_steps: int = 64) -> None:
        """Abort what is left and let the step still on the device finish, so the thread
        never leaves a computation running behind it."""
        for engine_id in aborts:
            self.engine.abort(engine_id)
        for _ in range(max_steps):
            if not self.engine.has_unfinished():
                return
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed while stopping")
                return
        log.warning("the engine still had requests after %d steps at stop", max_steps)

    def _add(self, sub: _Submission) -> None:
        try:
            self.engine.add_request(sub.prompt_ids, sub.params, sub.stream.engine_id,
                                    sub.priority)
        except InvalidRequestError as e:  # the handler validated; this is a safety net
            self._fail([sub.stream.engine_id], Failure(FailureKind.INVALID, e.message, e.field))
        except Exception as e:
            log.exception("add_request failed for %s", sub.stream.request_id)
            self._fail([sub.stream.engine_id],
                       Failure(FailureKind.INTERNAL, f"{type(e).__name__}: {e}"))

    def _ping(self) -> None:
        """(Idle) check that every peer process is still there; a hang shows in busy_for()."""
        self._busy_since = time.monotonic()
        try:
            self.engine.ping()
        except Exception as e:
            with self._cv:
                self._fatal(f"a peer process did not answer: {type(e).__name__}: {e}")
        finally:
            self._busy_since = None

    def _fatal(self, message: str) -> None:
        log.error("%s", message)
        self._stopping = self._failed = True
        if self._on_fatal is not None:
            self._on_fatal(message)

    def _step(self) -> list[RequestOutput]:
        self._busy_since = time.monotonic()
        try:
            return self.engine.step()
        except Exception as e:
            if self._multi_process:  # the processes are out of step: nothing can go on
                with self._cv:
                    self._fatal(f"a step failed across processes: {type(e).__name__}: {e}")
                return []
            # A failure outside any one request (per-request failures come back as outputs
            # with FinishReason.ERROR): end the requests the engine holds, keep serving new
            # ones. Submissions that arrived during the step are still in the inbox, not in
            # the engine: they run next.
            log.exception("engine step failed")
            with self._cv:
                queued = {sub.stream.engine_id for sub in self._inbox}
                engine_ids = [i for i in self._streams if i not in queued]
            for engine_id in engine_ids:
                self.engine.abort(engine_id)
            self._fail(engine_ids, Failure(FailureKind.INTERNAL,
                                           f"engine step failed: {type(e).__name__}: {e}"))
            return []
        finally:
            self._busy_since = None

    def _fail(self, engine_ids: list[str], failure: Failure) -> None:
        with self._cv:
            streams = [self._pop(i) for i in engine_ids]
        for s in streams:
            if s is not None:
                s._deliver(failure)

    def _pop(self, engine_id: str) -> RequestStream | None:
        stream = self._streams.pop(engine_id, None)
        if stream is not None:
            self._client_ids.discard(stream.request_id)
        return stream

    def _route(self, outputs: list[RequestOutput]) -> None:
        batches: dict[str, tuple[RequestStream, list[RequestOutput]]] = {}
        with self._cv:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted: nobody is listening
                batches.setdefault(out.request_id, (stream, []))[1].append(out)
                if out.finished:
                    self._pop(out.request_id)
        for stream, outs in batches.values():
            stream._deliver(outs)
