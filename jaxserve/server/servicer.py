"""The jaxserve.v1.InferenceService handlers. They run on the asyncio event loop and never
block it: tokenizing and validating happen on a small thread pool, generation on the engine
thread (engine_loop.py); a handler only waits on its request's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

from jaxserve.config import Config
from jaxserve.engine.engine import Engine
from jaxserve.engine.kv_memory import kv_dtype
from jaxserve.engine.request import RequestOutput, SamplingParams
from jaxserve.errors import InvalidRequestError
from jaxserve.server import protocol
from jaxserve.server.engine_loop import (
    EngineLoop,
    FailureKind,
    NotAdmittingError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.proto import jaxserve_pb2_grpc as pb_grpc
from sharding.rules import MESH_AXES

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
FIELD_METADATA_KEY = "jaxserve-invalid-field"  # trailing metadata naming the bad field

_FAILURE_CODES = {
    FailureKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    FailureKind.INTERNAL: grpc.StatusCode.INTERNAL,
    FailureKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class RpcError(Exception):
    """Ends an RPC with `code`; raised by the handlers' own code."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.field = field

    @classmethod
    def invalid(cls, field: str, message: str) -> RpcError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, config: Config, engine: Engine, engine_loop: EngineLoop,
                 metrics: ServerMetrics, executor: ThreadPoolExecutor):
        self._config = config
        self._engine = engine  # only its pure parts (validate, config, tokenizer) are used here
        self._engine_loop = engine_loop
        self._metrics = metrics
        self._executor = executor
        self._tokenizer = engine.tokenizer

    # ----- generation ----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        async with self._rpc("Generate", context, request):
            timing: list[tuple] = []
            async with contextlib.aclosing(self._generate(request, context,
                                                          timing)) as responses:
                async for response in responses:
                    await context.write(self._fits(response))
            self._metrics.observe_request(*timing[0])  # every response was sent

    async def GenerateUnary(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        async with self._rpc("GenerateUnary", context, request):
            whole, texts, timing = pb.GenerateResponse(), [], []
            async with contextlib.aclosing(self._generate(request, context,
                                                          timing)) as responses:
                async for response in responses:
                    texts.append(response.text)
                    whole.MergeFrom(response)  # appends repeated fields; last chunk's scalars
            whole.text = "".join(texts)
            whole = self._fits(whole)
            self._metrics.observe_request(*timing[0])  # it fits: it finished normally
            return whole

    async def _generate(self, request: pb.GenerateRequest, context, timing: list[tuple]):
        """Responses of one request, each holding what arrived since the previous one. Once
        the request has finished, `timing` gets its (arrival, first token, end, tokens) for
        the latency metrics, which the caller records once the response is delivered."""
        arrival = time.monotonic()
        prompt_ids, params = await self._run(self._prepare, request)
        stream = self._submit(request, prompt_ids, params)
        context.add_done_callback(lambda _: self._abort_unfinished(stream))
        first_token, n_tokens = None, 0
        try:
            while not stream.finished:
                try:
                    outputs = await stream.get()
                except RequestFailedError as e:
                    f = e.failure
                    details = f"{f.field}: {f.message}" if f.field else f.message
                    raise RpcError(_FAILURE_CODES[f.kind], details, f.field) from None
                n_tokens += sum(len(o.token_ids) for o in outputs)
                if first_token is None and n_tokens:
                    first_token = time.monotonic()
                yield _response(stream.request_id, outputs)
            timing.append((arrival, first_token, time.monotonic(), n_tokens))
        finally:
            self._abort_unfinished(stream)

    def _abort_unfinished(self, stream: RequestStream) -> None:
        if not stream.finished:
            self._engine_loop.abort(stream)

    def _prepare(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        """Tokenize and validate (on the thread pool); RpcError names the bad field."""
        kind = "prompt"
        try:
            protocol.check_request_id(request.request_id)
            kind, prompt = protocol.prompt_of(request)
            params = protocol.sampling_from_proto(request.sampling)
            prompt_ids = self._engine.inputs.encode(prompt)
            self._engine.validate(prompt_ids, params)
        except InvalidRequestError as e:
            raise RpcError.invalid(protocol.request_field(e.field, kind), e.message) from None
        return prompt_ids, params

    def _submit(self, request: pb.GenerateRequest, prompt_ids: list[int],
                params: SamplingParams) -> RequestStream:
        request_id = request.request_id or uuid.uuid4().hex
        try:
            return self._engine_loop.submit(prompt_ids, params, request_id=request_id,
                                            priority=request.priority,
                                            loop=asyncio.get_running_loop())
        except QueueFullError as e:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}") from None
        except NotAdmittingError as e:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except InvalidRequestError as e:
            raise RpcError.invalid(e.field, e.message) from None

    # ----- tokenizer and model -------------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        async with self._rpc("Tokenize", context, request):
            return self._fits(pb.TokenizeResponse(
                token_ids=await self._run(self._tokenize, request)))

    def _tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        if request.text and request.messages:
            raise RpcError.invalid("messages", "give text or messages, not both")
        if not request.text and not request.messages:
            raise RpcError.invalid("text", "give text or messages")
        self._need_tokenizer()
        try:
            if request.messages:
                return self._engine.inputs.encode_messages(
                    protocol.messages_of(request.messages))
            return self._engine.inputs.encode(request.text)
        except InvalidRequestError as e:
            raise RpcError.invalid(protocol.request_field(e.field, "text"), e.message) from None

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        async with self._rpc("Detokenize", context, request):
            return self._fits(pb.DetokenizeResponse(
                text=await self._run(self._detokenize, request)))

    def _detokenize(self, request: pb.DetokenizeRequest) -> str:
        self._need_tokenizer()
        vocab = self._engine.model_config.vocab_size
        bad = next((t for t in request.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RpcError.invalid("token_ids", f"token id {bad} is outside [0, {vocab})")
        return self._tokenizer.decode(list(request.token_ids),
                                      skip_special_tokens=not request.keep_special_tokens)

    def _need_tokenizer(self) -> None:
        if self._tokenizer is None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           "this model has no tokenizer (random weights): use token ids")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        async with self._rpc("GetModelInfo", context, request):
            return self._model_info()

    def _model_info(self) -> pb.ModelInfo:
        c, mc, tok = self._config, self._engine.model_config, self._tokenizer
        stats = self._engine_loop.stats
        return pb.ModelInfo(
            model_name=c.model.name, architecture=mc.architecture,
            context_length=c.cache.max_model_len, vocab_size=mc.vocab_size,
            dtype=c.model.dtype, mesh={a: getattr(c.mesh, a) for a in MESH_AXES},
            page_size=c.cache.page_size, token_buckets=list(c.runner.token_buckets),
            seq_buckets=list(c.runner.seq_buckets), max_num_seqs=c.scheduler.max_num_seqs,
            max_waiting=c.scheduler.max_waiting, max_logprobs=c.runner.max_logprobs,
            has_chat_template=tok is not None and tok.chat_template is not None,
            eos_token_ids=list(self._engine.eos_ids),
            quantization=mc.quantization, kv_dtype=str(kv_dtype(c)),
            kv_pages_total=stats.pages_total, kv_pages_used=stats.pages_used,
            kv_pages_free=stats.pages_free, num_running=stats.num_running,
            num_waiting=self._engine_loop.num_waiting,
            num_compilations=stats.num_compilations, num_preemptions=stats.num_preemptions)

    # ----- plumbing ------------------------------------------------------------------------
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context, request):
        """Maps RpcError to its status; counts every RPC once, with the code its client got.

        The count is taken when gRPC reports the RPC done: a handler that returned after the
        client's deadline (or was cut by it) counts DEADLINE_EXCEEDED, not OK or CANCELLED.
        The deadline is read when the handler's verdict is made, not when gRPC reports the
        RPC done (after the client's close, which may come after the deadline).
        """
        # the handler's own verdict, when it has one, and the time left when it was made
        outcome: list[tuple[grpc.StatusCode, float | None]] = []
        context.add_done_callback(lambda _: self._metrics.count(
            method, _final_code(outcome, context).name))
        try:
            if isinstance(request, Undecodable):
                log.warning("%s: undecodable request: %s", method, request.reason)
                raise RpcError.invalid("request", f"cannot decode the message: "
                                                  f"{request.reason}")
            if isinstance(request, Oversize):
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the request has {request.size} bytes; the limit is "
                               f"{self._config.server.max_message_bytes} "
                               "(server.max_message_bytes)")
            yield
            outcome.append((grpc.StatusCode.OK, context.time_remaining()))
        except RpcError as e:
            outcome.append((e.code, context.time_remaining()))
            metadata = ((FIELD_METADATA_KEY, e.field),) if e.field else ()
            await context.abort(e.code, e.details, metadata)
        except asyncio.CancelledError:
            raise  # the client went away or its deadline passed: _final_code tells which
        except Exception as e:
            outcome.append((grpc.StatusCode.INTERNAL, context.time_remaining()))
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error: {type(e).__name__}: {e}")

    def _fits(self, response):
        """A response over server.max_message_bytes: RESOURCE_EXHAUSTED from us, counted, rather
        than a transport failure after a handler that thinks it succeeded."""
        size = response.ByteSize()
        if size > self._config.server.max_message_bytes:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the response would have {size} bytes; the limit is "
                           f"{self._config.server.max_message_bytes} "
                           "(server.max_message_bytes)")
        return response


# The server learns a deadline from the request's headers, so its copy runs out a few ms
# after the client's (4-7 ms measured on one machine). A client whose deadline passes
# cancels the call, and the server sees that cancel just before its own deadline.
DEADLINE_SLACK_S = 0.1


def _final_code(outcome: list[tuple[grpc.StatusCode, float | None]],
                context) -> grpc.StatusCode:
    """What the client got: a handler's verdict, unless the deadline had passed when it was
    made; without one (the call was cancelled), a cancel that comes within DEADLINE_SLACK_S
    of the deadline, or after it, is the client's deadline."""
    if outcome:
        code, remaining = outcome[0]
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return code
    remaining = context.time_remaining()
    if remaining is not None and remaining < DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse (corrupt bytes, a string that is not UTF-8)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Oversize:
    """A request message over server.max_message_bytes (left unparsed)."""

    size: int


def _lenient(parse, max_bytes: int):
    """A deserializer that hands the handler an Undecodable or Oversize marker instead of
    raising, so the client gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED rather than UNKNOWN,
    the log one line rather than a traceback, and the RPC is counted."""
    def deserialize(data: bytes):
        if len(data) > max_bytes:
            return Oversize(len(data))
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 -- protobuf raises DecodeError and others
            return Undecodable(f"{type(e).__name__}: {str(e)[:200]}")
    return deserialize


def add_to_server(servicer: InferenceServicer, server, max_bytes: int) -> None:
    """Register the service with lenient request deserializers."""
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    handlers = {}
    for m in service.methods:
        make = (grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_lenient(getattr(pb, m.input_type.name).FromString,
                                          max_bytes),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _response(request_id: str, outputs: list[RequestOutput]) -> pb.GenerateResponse:
    last = outputs[-1]
    response = pb.GenerateResponse(
        request_id=request_id, text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        logprobs=protocol.logprobs_to_proto([lp for o in outputs for lp in o.logprobs]))
    if last.finished:
        response.finish_reason = protocol.finish_to_proto(last.finish_reason)
        response.usage.CopyFrom(protocol.usage_to_proto(last.metrics))
    return response
