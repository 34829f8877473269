"""Conversions between jaxserve.v1 messages and the engine's types, both ways.

The server turns requests into (prompt, SamplingParams) and engine outputs into responses;
the client and the load generator build requests from SamplingParams.
"""

from __future__ import annotations

import dataclasses

from jaxserve.engine.request import FinishReason, RequestMetrics, SamplingParams, TokenLogprob
from jaxserve.errors import InvalidRequestError
from jaxserve.server.proto import jaxserve_pb2 as pb

PROMPT_KINDS = ("prompt", "token_ids", "messages")
MAX_REQUEST_ID_CHARS = 256

_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
FINISH_NAMES = {v: k.value for k, v in _FINISH.items()}
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_DEFAULTS = SamplingParams()


def host_port(host: str, port: int) -> str:
    """`host:port`, bracketing an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# ----- requests --------------------------------------------------------------------------
def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Engine params; unset optional fields take the engine's defaults."""
    def opt(name, default):
        return getattr(msg, name) if msg.HasField(name) else default

    return SamplingParams(
        max_tokens=opt("max_tokens", _DEFAULTS.max_tokens),
        temperature=opt("temperature", _DEFAULTS.temperature),
        top_p=opt("top_p", _DEFAULTS.top_p),
        top_k=msg.top_k,
        min_p=msg.min_p,
        repetition_penalty=opt("repetition_penalty", _DEFAULTS.repetition_penalty),
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=opt("seed", None),
        logprobs=opt("logprobs", None),
        min_tokens=msg.min_tokens,
        ignore_eos=msg.ignore_eos,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        speculative=opt("speculative", True),
    )


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        min_tokens=params.min_tokens, ignore_eos=params.ignore_eos, stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids))
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if not params.speculative:
        msg.speculative = False
    return msg


def make_request(prompt: str | list[int] | list[dict] | None = None, *,
                 params: SamplingParams | None = None, chat: bool = False,
                 request_id: str = "", priority: int = 0) -> pb.GenerateRequest:
    """A GenerateRequest from text, token ids or chat messages ({"role", "content"} dicts);
    `chat` wraps text in one user message."""
    req = pb.GenerateRequest(request_id=request_id, priority=priority,
                             sampling=sampling_to_proto(params or SamplingParams()))
    if isinstance(prompt, str) and chat:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                            for m in prompt)
    elif prompt is not None:
        req.token_ids.extend(int(t) for t in prompt)
    return req


def prompt_of(request: pb.GenerateRequest) -> tuple[str, str | list[int] | dict]:
    """(kind, prompt for InputProcessor.encode); exactly one prompt kind must be present."""
    present = [k for k, here in (("prompt", request.HasField("prompt")),
                                 ("token_ids", len(request.token_ids) > 0),
                                 ("messages", len(request.messages) > 0)) if here]
    if not present:
        raise InvalidRequestError("prompt", "give one of prompt, token_ids or messages")
    if len(present) > 1:
        raise InvalidRequestError(present[1], f"give only one of prompt, token_ids or "
                                              f"messages (got {', '.join(present)})")
    kind = present[0]
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return kind, request.prompt
    if kind == "token_ids":
        return kind, list(request.token_ids)
    return kind, {"messages": messages_of(request.messages)}


def messages_of(messages) -> list[dict]:
    for i, m in enumerate(messages):
        if not m.role:
            raise InvalidRequestError(f"messages[{i}].role", "the role is empty")
    return [{"role": m.role, "content": m.content} for m in messages]


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidRequestError("request_id", f"must be printable and at most "
                                                f"{MAX_REQUEST_ID_CHARS} characters")


def request_field(field: str, prompt_kind: str) -> str:
    """The request field an engine error names: sampling fields live in `sampling`, and the
    engine's "prompt" is whichever prompt kind the request used."""
    if field in _SAMPLING_FIELDS:
        return f"sampling.{field}"
    if field == "prompt":
        return prompt_kind
    return field


# ----- responses -------------------------------------------------------------------------
def logprobs_to_proto(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]):
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
            for lp in logprobs]


def usage_to_proto(metrics: RequestMetrics | None) -> pb.Usage:
    if metrics is None:
        return pb.Usage()
    return pb.Usage(prompt_tokens=metrics.prompt_tokens,
                    completion_tokens=metrics.completion_tokens,
                    cached_tokens=metrics.cached_tokens,
                    draft_tokens=metrics.draft_tokens,
                    accepted_tokens=metrics.accepted_tokens)


def finish_to_proto(reason: FinishReason | None) -> int:
    return _FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED)
