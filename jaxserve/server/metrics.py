"""Prometheus metrics of one server, in their own registry, served over HTTP on
`server.metrics_port` (0 or null: no endpoint).

Latencies are measured in the handlers (what a client sees, tokenization and queueing
included); engine figures are set by the engine thread after every step. While the endpoint
serves, every pause of Python's garbage collector is observed too (heap.PauseWatch), by
generation: a long one stalls the engine's thread and every stream with it.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from jaxserve.engine.engine import EngineStats
from jaxserve.engine.heap import PauseWatch
from jaxserve.engine.request import RequestOutput

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                  0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds",
                              "Request arrival to its first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_request_latency_seconds",
                             "Request arrival to its last token", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.queue_depth = Gauge("jaxserve_queue_depth", "Requests waiting to be scheduled",
                                 registry=r)
        self.running = Gauge("jaxserve_running_requests", "Requests being generated",
                             registry=r)
        self.kv_pages_used = Gauge("jaxserve_kv_pages_used", "KV cache pages in use",
                                   registry=r)
        self.kv_pages_free = Gauge("jaxserve_kv_pages_free", "KV cache pages free", registry=r)
        self.generated_tokens = Counter("jaxserve_generated_tokens",
                                        "Tokens generated (rate() gives tokens/s)", registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.preemptions = Counter("jaxserve_preemptions", "Requests preempted for KV pages",
                                   registry=r)
        self.compilations = Counter("jaxserve_compilations", "XLA compilations", registry=r)
        # Speculative decoding: acceptance rate = accepted / draft; mean accepted length
        # (tokens per verifying step) = (accepted + verify_steps) / verify_steps.
        self.spec_draft = Counter("jaxserve_spec_draft_tokens", "Speculative tokens proposed",
                                  registry=r)
        self.spec_accepted = Counter("jaxserve_spec_accepted_tokens",
                                     "Speculative tokens accepted", registry=r)
        self.spec_steps = Counter("jaxserve_spec_verify_steps",
                                  "Sequence-steps that verified a proposal", registry=r)
        self._last_spec = (0, 0, 0)
        self.requests = Counter("jaxserve_requests", "Finished RPCs by method and gRPC code",
                                ["method", "code"], registry=r)
        gc_pause = Histogram("jaxserve_gc_pause_seconds",
                             "Pauses of Python's garbage collector, by generation (2: the "
                             "oldest, which start-up's objects are frozen out of)",
                             ["generation"], buckets=_GC_BUCKETS, registry=r)
        # made now: the collector's callback allocates nothing
        by_generation = [gc_pause.labels(generation=str(g)) for g in range(3)]
        self._gc_watch = PauseWatch(lambda generation, seconds:
                                    by_generation[generation].observe(seconds))
        self._last_preemptions = 0
        self._last_compilations = 0
        self._http = None

    # ----- the engine thread ---------------------------------------------------------------
    def observe_engine(self, stats: EngineStats, outputs: list[RequestOutput],
                       num_waiting: int) -> None:
        self.queue_depth.set(num_waiting)
        self.running.set(stats.num_running)
        self.kv_pages_used.set(stats.pages_used)
        self.kv_pages_free.set(stats.pages_free)
        new_tokens = sum(len(o.token_ids) for o in outputs)
        if new_tokens:
            self.generated_tokens.inc(new_tokens)
        prompt = sum(o.metrics.prompt_tokens for o in outputs if o.finished and o.metrics)
        if prompt:
            self.prompt_tokens.inc(prompt)
        self._last_preemptions = self._add_delta(self.preemptions, stats.num_preemptions,
                                                 self._last_preemptions)
        self._last_compilations = self._add_delta(self.compilations, stats.num_compilations,
                                                  self._last_compilations)
        self._last_spec = tuple(
            self._add_delta(counter, total, last) for counter, total, last in zip(
                (self.spec_draft, self.spec_accepted, self.spec_steps),
                (stats.draft_tokens, stats.accepted_tokens, stats.verify_steps),
                self._last_spec, strict=True))

    @staticmethod
    def _add_delta(counter: Counter, total: int, last: int) -> int:
        if total > last:
            counter.inc(total - last)
        return max(total, last)

    # ----- the handlers --------------------------------------------------------------------
    def observe_request(self, arrival: float, first_token: float | None, end: float,
                        completion_tokens: int) -> None:
        """Times (time.monotonic()) of a request that finished normally."""
        self.e2e.observe(end - arrival)
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        if completion_tokens > 1:
            self.tpot.observe((end - first_token) / (completion_tokens - 1))

    def count(self, method: str, code_name: str) -> None:
        self.requests.labels(method=method, code=code_name).inc()

    # ----- HTTP ----------------------------------------------------------------------------
    def start_http(self, host: str, port: int | None) -> int | None:
        """Serve /metrics on host:port, and observe the collector's pauses meanwhile;
        returns the bound port (None: disabled)."""
        if not port:
            return None
        # an IPv6 address as the config may give it, in brackets: the socket takes it bare
        self._http, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        self._gc_watch.start()
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            self._gc_watch.stop()
            self._http.shutdown()
            self._http.server_close()
            self._http = None
