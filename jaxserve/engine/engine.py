"""The engine: add / abort / step over the scheduler and runner, with detokenization.

`step()` dispatches the next device step before it reads back the previous one, so the
host's Python work (scheduling, detokenizing, stop strings) overlaps the device's.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Callable

from jaxserve.config import Config
from jaxserve.engine.input_processor import InputProcessor
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    SpecCounts,
    Status,
    TokenLogprob,
)
from jaxserve.engine.runner import Runner, StepHandle
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.speculative import make_proposer, may_speculate, record
from jaxserve.errors import InvalidRequestError
from jaxserve.models.model_config import ModelConfig
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    held: str = ""  # detokenized text not yet emitted (may be the start of a stop string)
    queued: list[RequestOutput] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    pages_total: int
    pages_used: int
    pages_free: int
    num_compilations: int
    num_preemptions: int
    draft_tokens: int = 0  # speculative decoding, since start: tokens proposed
    accepted_tokens: int = 0  # of which accepted
    verify_steps: int = 0  # sequence-steps that verified a proposal


@dataclasses.dataclass
class StepTimes:
    """Seconds spent in each phase of `step()`, summed over steps (benchmarks read these).

    host = propose + schedule + inputs + outputs: the Python work of a step, which the
    device step must hide; wait: blocked reading back the previous step (the device is
    behind). With speculative decoding a step may read back and process the step in flight
    before proposing: that counts in wait and outputs as in any step."""

    steps: int = 0
    schedule: float = 0.0  # the scheduler's choice of sequences and pages
    inputs: float = 0.0  # building the step's inputs and dispatching it
    wait: float = 0.0  # reading back the previous step's tokens
    outputs: float = 0.0  # appending tokens, detokenizing, stop checks, output records
    propose: float = 0.0  # speculative decoding: the proposer's draft tokens

    @property
    def host(self) -> float:
        return self.propose + self.schedule + self.inputs + self.outputs

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {f"{k}_ms": getattr(self, k) / n * 1e3
                for k in ("host", "propose", "schedule", "inputs", "outputs", "wait")}


class Engine:
    def __init__(self, config: Config, model_config: ModelConfig, params, tokenizer: Tokenizer,
                 mesh):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer  # None for random-weight models: token ids only, no text
        self.eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
        # Prompts -> checked token ids, for the offline API and the server alike.
        self.inputs = InputProcessor(tokenizer, config.cache.max_model_len,
                                     config.tokenizer.special_tokens_in_content)
        self.runner = Runner(config, model_config, params, mesh, self.eos_ids)
        self.page_tables = [PageTable(self.runner.num_pages, config.cache.page_size)
                            for _ in range(self.runner.num_shards)]  # one per data shard
        self.scheduler = Scheduler(config.scheduler, self.page_tables, self.runner.stages)
        self._tracked: dict[str, _Tracked] = {}
        self._inflight: StepHandle | None = None
        self._ids = itertools.count()
        self._rng = random.Random()
        self.step_times = StepTimes()
        spec = config.speculative
        self.proposer = make_proposer(spec, model_config.vocab_size) if spec.enabled else None
        self._spec_totals = SpecCounts()  # every request's, since start

    # ----- requests ------------------------------------------------------------------
    def has_request(self, request_id: str) -> bool:
        """Whether the request is queued or running here (not finished and handed out)."""
        return request_id in self._tracked

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Queue a request; raises InvalidRequestError naming the bad field."""
        if not request_id:  # the next automatic id that no caller's request holds
            request_id = next(i for i in (f"req-{n}" for n in self._ids)
                              if i not in self._tracked)
        if request_id in self._tracked:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        self.validate(prompt_ids, params)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**32)
        req = Request(request_id, list(prompt_ids), params, seed, time.monotonic(), priority)
        detok = (IncrementalDetokenizer(self.tokenizer, prompt_ids)
                 if self.tokenizer is not None else None)
        self._tracked[request_id] = _Tracked(req, detok)
        self.scheduler.add(req)
        return request_id

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate(self.model_config.vocab_size, self.config.runner.max_logprobs)
        if not prompt_ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("token_ids", f"token id {bad} is outside [0, {vocab})")
        limit = self.config.cache.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                "prompt", f"the prompt has {len(prompt_ids)} tokens; the context is {limit}")
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                f"({params.max_tokens}) exceeds the context of {limit} tokens")
        budget = self.config.scheduler.max_num_batched_tokens
        if not self.config.scheduler.chunked_prefill and len(prompt_ids) > budget:
            raise InvalidRequestError(
                "prompt", f"{len(prompt_ids)} tokens exceed scheduler.max_num_batched_tokens="
                f"{budget} and chunked prefill is off")

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its pages are freed and its last output says ABORT."""
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.request.is_finished:
            return False
        self._finish(tracked, FinishReason.ABORT)
        tracked.queued.append(RequestOutput(request_id, (), tracked.held, True,
                                            FinishReason.ABORT, (), tracked.request.metrics()))
        return True

    @property
    def in_flight(self) -> StepHandle | None:
        """The step dispatched last and not yet read back (profiling)."""
        return self._inflight

    def has_unfinished(self) -> bool:
        return bool(self._tracked) or self._inflight is not None

    def stats(self) -> EngineStats:
        pts = self.page_tables
        return EngineStats(self.scheduler.num_waiting, len(self.scheduler.running),
                           sum(pt.num_pages - 1 for pt in pts),
                           sum(pt.num_used_pages for pt in pts),
                           sum(pt.num_free_pages for pt in pts),
                           self.runner.num_compilations, self.scheduler.num_preemptions,
                           self._spec_totals.proposed, self._spec_totals.accepted,
                           self._spec_totals.steps)

    def warm_up(self, progress: bool = True, stop: Callable[[], bool] | None = None) -> bool:
        """Compile (and run once) every program serving may run. `stop` is asked between
        programs; False if it ended warm-up early (one process only: Runner.warm_up)."""
        if not self.runner.warm_up(progress, stop):
            return False
        return self.proposer is None or self.proposer.warm_up(progress, stop)

    def ping(self) -> None:
        """Over several processes: a collective that returns only if they are all there."""
        self.runner.ping()

    def close(self) -> None:
        """Release the followers (over several processes) and the dispatch thread (call once,
        when done: no step after it)."""
        self.runner.close()

    # ----- the step ------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch one step, then process the previous step's tokens.

        A step that raises (a device fault, an interrupt) may leave pages it registered in
        the prefix cache unwritten, or half written: the prefix cache is dropped, so no
        later request shares them. The requests keep their pages; callers that go on
        serving abort them (server/engine_loop.py, llm.py)."""
        try:
            return self._step()
        except BaseException:
            for table in self.page_tables:
                table.forget_cached()
            raise

    def _step(self) -> list[RequestOutput]:
        times, t0 = self.step_times, time.perf_counter()
        if self.proposer is not None:
            self._propose(times)
            t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if self.proposer is not None:
            scheduled = {id(seq.request) for seq in sched.seqs}
            for req in self.scheduler.running:
                if id(req) not in scheduled:  # no budget or seat this step
                    req.draft, req.spec_eligible = [], False
        for req in sched.preempted:
            self.runner.release(req.request_id)
        t1 = time.perf_counter()
        handle = None
        if sched.seqs or self.runner.pipeline_busy:
            handle = self.runner.execute(sched, self.page_tables, self._inflight)
        previous, self._inflight = self._inflight, handle
        t2 = t3 = time.perf_counter()
        if previous is not None:
            try:
                out = previous.fetch()
            except BaseException:
                # its call failed (or the device did): the step dispatched after it took
                # its tokens, so it is lost too; the caller aborts their requests
                self._inflight = None
                raise
            t3 = time.perf_counter()
            self._process(previous, out)
        outputs = self._drain()
        times.steps += 1
        times.schedule += t1 - t0
        times.inputs += t2 - t1
        times.wait += t3 - t2
        times.outputs += time.perf_counter() - t3
        return outputs

    def _propose(self, times: StepTimes) -> None:
        """Speculative decoding: read back the step in flight if a request that speculates
        needs its token (a proposal continues the known sequence), then propose."""
        running = self.scheduler.running
        if self._inflight is not None and any(
                req.num_pending and may_speculate(req) for req in running):
            t = time.perf_counter()
            previous, self._inflight = self._inflight, None
            out = previous.fetch()
            t1 = time.perf_counter()
            self._process(previous, out)
            times.wait += t1 - t
            times.outputs += time.perf_counter() - t1
        t = time.perf_counter()
        k = self.config.speculative.num_tokens
        ready = [req for req in running if req.num_pending == 0 and may_speculate(req)
                 and req.num_computed_tokens == req.num_tokens - 1]
        room = {req.request_id: min(k, req.params.max_tokens - len(req.output_ids) - 1)
                for req in ready}
        ready = [req for req in ready if room[req.request_id] > 0]
        for req in ready:
            req.spec_eligible = True
        if ready:
            drafts = self.proposer.propose(ready, room)
            for req in ready:
                req.draft = drafts.get(req.request_id, [])
        times.propose += time.perf_counter() - t

    def _drain(self) -> list[RequestOutput]:
        outputs = []
        finished = []
        for request_id, tracked in self._tracked.items():
            if tracked.queued:
                outputs += tracked.queued
                tracked.queued = []
            if tracked.request.status is Status.FINISHED:
                finished.append(request_id)
        for request_id in finished:
            del self._tracked[request_id]
        return outputs

    def _process(self, handle: StepHandle, out) -> None:
        # Python ints at once, not one numpy scalar per token
        tokens, num_accepted = out.tokens.tolist(), out.num_accepted.tolist()
        multi_step = handle.steps > 1
        for req, shard, row in handle.rows:
            # Tokens after the row's first: accepted proposals (speculative decoding), or
            # the further steps of a multi-step decode (all sampled, all pending until now).
            accepted = num_accepted[shard][row]
            req.num_pending -= accepted + 1 if multi_step else 1
            proposed = len(req.draft)
            if proposed:
                req.draft = []
            eligible, req.spec_eligible = req.spec_eligible, False
            if req.is_finished:
                if eligible:  # none of its proposals is used
                    self._record_spec(req, proposed, 0)
                continue
            if proposed > accepted:  # rejected tokens: their K/V and pages are dropped
                req.num_computed_tokens -= proposed - accepted
                self.scheduler.page_tables[req.shard].truncate(req.request_id,
                                                               req.num_computed_tokens)
            tracked = self._tracked[req.request_id]
            if not accepted and req.params.logprobs is None:  # most steps: one token
                if eligible:
                    self._record_spec(req, proposed, 0)
                try:
                    self._append(tracked, tokens[shard][row][0], None)
                except Exception as e:  # one request's failure never stops the others
                    self._fail(tracked, e)
                continue
            appended = 0
            try:
                for j in range(accepted + 1):
                    if req.is_finished:  # a stop inside the accepted run ends it there
                        break
                    appended += 1
                    logprob = None
                    if req.params.logprobs is not None:
                        n = req.params.logprobs
                        logprob = TokenLogprob(
                            tokens[shard][row][j], float(out.logprobs[shard, row, j]),
                            tuple(zip(out.top_ids[shard, row, j, :n].tolist(),
                                      out.top_logprobs[shard, row, j, :n].tolist(),
                                      strict=True)))
                    self._append(tracked, tokens[shard][row][j], logprob)
            except Exception as e:  # one request's failure never stops the others
                self._fail(tracked, e)
            if eligible:  # the accepted proposals it kept: none after a stop among them
                self._record_spec(req, proposed, min(appended, accepted))
                last = tracked.queued[-1] if tracked.queued else None
                if last is not None and last.metrics is not None:  # it finished: its usage
                    tracked.queued[-1] = dataclasses.replace(last, metrics=req.metrics())

    def _record_spec(self, req: Request, proposed: int, accepted: int) -> None:
        record(req, proposed, accepted, self.config.speculative)
        self._spec_totals.add(proposed, accepted)

    def _fail(self, tracked: _Tracked, e: Exception) -> None:
        req = tracked.request
        self._finish(tracked, FinishReason.ERROR)
        tracked.queued.append(RequestOutput(req.request_id, (), "", True, FinishReason.ERROR,
                                            (), req.metrics(),
                                            error=f"{type(e).__name__}: {e}"))

    def _append(self, tracked: _Tracked, token: int, logprob: TokenLogprob | None) -> None:
        req, p = tracked.request, tracked.request.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_ids.append(token)
        n_out = len(req.output_ids)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            reason, text = FinishReason.STOP, self._flush(tracked, n_out >= p.min_tokens)[0]
        else:
            added = tracked.detokenizer.add([token]) if tracked.detokenizer is not None else ""
            tracked.held += added
            if p.stop:
                text, stopped = self._release_text(tracked, len(added),
                                                   check_stop=n_out >= p.min_tokens)
            else:  # no stop string to hold text back for
                text, stopped, tracked.held = tracked.held, False, ""
            reason = FinishReason.STOP if stopped else None
            if reason is None and n_out >= p.max_tokens:
                rest, stopped = self._flush(tracked, n_out >= p.min_tokens)
                reason, text = FinishReason.STOP if stopped else FinishReason.LENGTH, text + rest
        lp = (logprob,) if logprob is not None else ()
        if reason is not None:
            self._finish(tracked, reason)
        tracked.queued.append(RequestOutput(req.request_id, (token,), text, reason is not None,
                                            reason, lp, req.metrics() if reason else None))

    def _flush(self, tracked: _Tracked, check_stop: bool) -> tuple[str, bool]:
        """All the text still held, at the end: the detokenizer's too (a token that ended in
        an unfinished character was held whole), cut before a stop string that it completes;
        and whether one did."""
        added = tracked.detokenizer.flush() if tracked.detokenizer else ""
        tracked.held += added
        text, stopped = self._release_text(tracked, len(added), check_stop)
        if not stopped:
            text, tracked.held = text + tracked.held, ""
        return text, stopped

    def _release_text(self, tracked: _Tracked, added: int,
                      check_stop: bool) -> tuple[str, bool]:
        """Emit held text, keeping back what could still become a stop string. Only a stop
        string that ends in the `added` characters (this token's text) stops the request: one
        completed before min_tokens was reached is passed over for good, however long the
        other stop strings keep the text held."""
        stops = tracked.request.params.stop
        held = tracked.held
        if not stops:
            tracked.held = ""
            return held, False
        if check_stop:
            before = len(held) - added  # held text that earlier tokens' checks have seen
            hits = [i for i in (held.find(s, max(0, before - len(s) + 1)) for s in stops)
                    if i >= 0]
            if hits:
                tracked.held = ""
                return held[:min(hits)], True
        keep = max((len(s) for s in stops), default=1) - 1
        cut = max(len(held) - keep, 0)  # all of it held while shorter than keep
        tracked.held = held[cut:]
        return held[:cut], False

    def _finish(self, tracked: _Tracked, reason: FinishReason) -> None:
        req = tracked.request
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        self.scheduler.remove(req)
        self.runner.release(req.request_id)
        if self.proposer is not None:
            self.proposer.forget(req.request_id)
