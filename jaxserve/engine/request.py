"""Requests, their sampling parameters and the outputs the engine streams back."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import math
import numbers

from jaxserve.errors import InvalidRequestError

DEFAULT_MAX_TOKENS = 64  # the server's and the CLI's, when a request names none
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # output is held back by one stop string's length
MAX_STOP_TOKEN_IDS = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) means no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token + top n
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    speculative: bool = True  # False: this request never speculates (speculative: config)

    def __post_init__(self):
        # One string is one stop string (tuple() would split it into its characters).
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        ids = self.stop_token_ids
        ids = (ids,) if isinstance(ids, numbers.Integral) else tuple(ids)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)

    def validate(self, vocab_size: int, max_logprobs: int) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        def bad(field, why):
            raise InvalidRequestError(field, why)

        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            bad("max_tokens", f"must be >= 1 (got {self.max_tokens})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", f"must be >= 0 (got {self.temperature})")
        if not (0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1] (got {self.top_p})")
        if self.top_k < -1:
            bad("top_k", f"must be -1 (off), 0 (off) or positive (got {self.top_k})")
        if not (0 <= self.min_p <= 1):
            bad("min_p", f"must be in [0, 1] (got {self.min_p})")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", f"must be > 0 (got {self.repetition_penalty})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                bad(name, f"must be in [-2, 2] (got {value})")
        if self.seed is not None and not (0 <= self.seed < 2**32):
            bad("seed", f"must be in [0, 2**32) (got {self.seed})")
        if self.logprobs is not None and not (0 <= self.logprobs <= max_logprobs):
            bad("logprobs", f"must be in [0, {max_logprobs}] (got {self.logprobs})")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            bad("min_tokens",
                f"must be in [0, max_tokens={self.max_tokens}] (got {self.min_tokens})")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings (got {len(self.stop)})")
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            bad("stop", f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters "
                        f"(got {max(len(s) for s in self.stop)})")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids",
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids (got {len(self.stop_token_ids)})")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                bad("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the top-n, best first


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    preemptions: int
    draft_tokens: int = 0  # speculative decoding: tokens proposed
    accepted_tokens: int = 0  # of which accepted
    verify_steps: int = 0  # steps that verified a proposal


# Not frozen: one is made per request and step, and a frozen dataclass's __init__ costs
# about 4x more.
@dataclasses.dataclass(slots=True)
class RequestOutput:
    """One step's delta for one request."""

    request_id: str
    token_ids: tuple[int, ...]  # new token ids (an EOS that ended generation included)
    text: str  # new text (stop strings and EOS never included)
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    metrics: RequestMetrics | None = None  # on the last output
    error: str | None = None


class TokenView(collections.abc.Sequence):
    """prompt + output ids, indexed and sliced as one sequence without a copy."""

    __slots__ = ("_prompt", "_output")

    def __init__(self, prompt: list[int], output: list[int]):
        self._prompt, self._output = prompt, output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    def __getitem__(self, i):
        n = len(self._prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= n:
                return self._prompt[start:stop]
            if start >= n:
                return self._output[start - n:stop - n]
            return self._prompt[start:] + self._output[:stop - n]
        if i < 0:
            i += len(self)
        return self._prompt[i] if i < n else self._output[i - n]


@dataclasses.dataclass
class SpecCounts:
    """A request's speculative-decoding tallies."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # steps that verified a proposal
    recent: collections.deque = dataclasses.field(  # accepted per step, the last window
        default_factory=collections.deque)

    def add(self, proposed: int, accepted: int) -> None:
        """Count one step: `proposed` tokens verified (0: nothing was proposed)."""
        self.proposed += proposed
        self.accepted += accepted
        self.steps += proposed > 0


@dataclasses.dataclass(eq=False)
class Request:
    """A request's mutable engine-side state. The scheduler and engine own its fields."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed, drawn at arrival when params.seed is None
    arrival_time: float
    priority: int = 0  # lower runs first; FCFS among equals
    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_pending: int = 0  # tokens sampled on the device, not yet read back (0 or 1; up to
    #                       scheduler.decode_steps from a multi-step call)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0
    shard: int = 0  # the data shard holding its KV pages (assigned at each admission)
    ready_tick: int = 0  # the first scheduler tick at which its next input is available
    finish_reason: FinishReason | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Speculative decoding (engine/speculative.py)
    draft: list[int] = dataclasses.field(default_factory=list)  # proposed for the next step
    speculating: bool = True  # False once its acceptance stayed low
    spec_eligible: bool = False  # it could propose this step (counted when read back)
    spec: SpecCounts = dataclasses.field(default_factory=lambda: SpecCounts())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, counting one still on the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt and output ids, as a new list (use `token_ids` to avoid the copy)."""
        return self.prompt_ids + self.output_ids

    @property
    def token_ids(self) -> TokenView:
        """Prompt and output ids as one read-only sequence, without copying them."""
        return TokenView(self.prompt_ids, self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def metrics(self) -> RequestMetrics:
        return RequestMetrics(
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            cached_tokens=self.num_cached_tokens,
            preemptions=self.num_preemptions,
            draft_tokens=self.spec.proposed,
            accepted_tokens=self.spec.accepted,
            verify_steps=self.spec.steps,
        )
