"""Every bad request is refused with INVALID_ARGUMENT naming the field, before it reaches
the engine (nothing runs, nothing waits)."""

import grpc
import pytest

from jaxserve.engine.request import DEFAULT_MAX_TOKENS, SamplingParams
from jaxserve.server.client import Client
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.servicer import FIELD_METADATA_KEY

VOCAB = 49152
CONTEXT = 2048  # the demo config's cache.max_model_len


def _req(prompt="Hello", **sampling):
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.token_ids.extend(prompt)
    return req


def _two_kinds():
    req = _req("Hello")
    req.token_ids.extend([1, 2])
    return req


def _role(role: str):
    return pb.GenerateRequest(messages=[pb.ChatMessage(role=role, content="hi")])


CASES = [
    ("empty prompt", _req(""), "prompt"),
    ("no prompt", _req(None), "prompt"),
    ("two prompt kinds", _two_kinds(), "token_ids"),
    ("empty message role", _role(""), "messages[0].role"),
    ("unknown message role", _role("root"), "messages[0].role"),
    ("role with a newline", _role("user\nsystem"), "messages[0].role"),
    ("token id >= vocab", _req([1, VOCAB]), "token_ids"),
    ("negative token id", _req([1, -3]), "token_ids"),
    ("prompt longer than the context", _req([5] * (CONTEXT + 10)), "token_ids"),
    ("text prompt longer than the context", _req("hello " * (CONTEXT + 10)), "prompt"),
    ("max_tokens cannot fit", _req([5] * 100, max_tokens=CONTEXT - 50), "sampling.max_tokens"),
    ("max_tokens 0", _req(max_tokens=0), "sampling.max_tokens"),
    ("negative temperature", _req(temperature=-0.5), "sampling.temperature"),
    ("top_p 0", _req(top_p=0.0), "sampling.top_p"),
    ("top_p > 1", _req(top_p=1.5), "sampling.top_p"),
    ("top_k < -1", _req(top_k=-2), "sampling.top_k"),
    ("min_p > 1", _req(min_p=1.5), "sampling.min_p"),
    ("repetition_penalty 0", _req(repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("presence_penalty > 2", _req(presence_penalty=2.5), "sampling.presence_penalty"),
    ("frequency_penalty < -2", _req(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    ("seed >= 2**32", _req(seed=2**32), "sampling.seed"),
    ("negative seed", _req(seed=-1), "sampling.seed"),
    ("too many logprobs", _req(logprobs=1000), "sampling.logprobs"),
    ("min_tokens > max_tokens", _req(max_tokens=4, min_tokens=5), "sampling.min_tokens"),
    ("empty stop string", _req(stop=[""]), "sampling.stop"),
    ("too many stop strings", _req(stop=[f"s{i}" for i in range(17)]), "sampling.stop"),
    ("stop string too long", _req(stop=["x" * 1000]), "sampling.stop"),
    ("stop token id >= vocab", _req(stop_token_ids=[VOCAB]), "sampling.stop_token_ids"),
    ("request_id too long", pb.GenerateRequest(request_id="x" * 300, prompt="hi"),
     "request_id"),
]


@pytest.fixture(scope="module")
def client(server_config, start_server):
    with start_server(server_config) as (_, port), Client("127.0.0.1", port) as c:
        yield c


@pytest.mark.parametrize("method", ["Generate", "GenerateUnary"])
@pytest.mark.parametrize(("request_", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_invalid_argument_names_the_field(client, method, request_, field):
    with pytest.raises(grpc.RpcError) as e:
        result = getattr(client.stub, method)(request_, timeout=30)
        if method == "Generate":
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: "), e.value.details()
    assert (FIELD_METADATA_KEY, field) in tuple(e.value.trailing_metadata())


def test_a_huge_prompt_is_refused_by_its_size_before_tokenizing(client):
    with pytest.raises(grpc.RpcError) as e:
        client.generate_unary("x" * (15 << 20), SamplingParams(max_tokens=1), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"prompt: the text is longer than the context of "
                                        f"{CONTEXT} tokens could hold ("), e.value.details()


def test_nothing_reached_the_engine(client):
    info = client.model_info()
    assert (info.num_running, info.num_waiting, info.kv_pages_used) == (0, 0, 0)


def test_model_info_names_the_weights_and_cache_storage(client):
    info = client.model_info()
    assert (info.dtype, info.quantization, info.kv_dtype) == ("float32", "none", "float32")


def test_duplicate_running_request_id(client, pages_back):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    first = client.generate("Hello", long, request_id="same")
    next(first)
    with pytest.raises(grpc.RpcError) as e:
        client.generate_unary("Hello", long, request_id="same")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("request_id: ")
    first.cancel()
    pages_back(client, 0)
    # the id is free again once the first request is gone (an aborted id may be reused)
    reply = client.generate_unary("Hello", SamplingParams(max_tokens=2), request_id="same")
    assert reply.request_id == "same"


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.stub.Tokenize(pb.TokenizeRequest()), "text"),
    (lambda c: c.stub.Tokenize(pb.TokenizeRequest(
        text="a", messages=[pb.ChatMessage(role="user", content="b")])), "messages"),
    (lambda c: c.stub.Detokenize(pb.DetokenizeRequest(token_ids=[VOCAB])), "token_ids"),
], ids=["tokenize nothing", "tokenize both", "detokenize outside vocab"])
def test_tokenizer_rpcs_validate(client, call, field):
    with pytest.raises(grpc.RpcError) as e:
        call(client)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ")


def test_tokenize_bounds_name_the_request_fields(client):
    """Text too long for the context, and more messages than the context has tokens, are
    refused before tokenizing, naming TokenizeRequest's own fields."""
    context = client.model_info().context_length
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Tokenize(pb.TokenizeRequest(text="x" * (context * 1024)), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("text: the text is longer than the context")
    many = [pb.ChatMessage(role="user", content="")] * (context + 1)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Tokenize(pb.TokenizeRequest(messages=many), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == (f"messages: {context + 1} messages exceed the context of "
                                 f"{context} tokens")


def test_unset_max_tokens_takes_the_documented_default(client):
    """docs/serving.md and the proto say 64 tokens when a request names none."""
    reply = client.stub.GenerateUnary(pb.GenerateRequest(
        prompt="Count:", sampling=pb.SamplingParams(temperature=0.0, ignore_eos=True)),
        timeout=120)
    assert reply.usage.completion_tokens == DEFAULT_MAX_TOKENS == 64
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH


def _raw(client, method: str, data: bytes) -> grpc.RpcError:
    call = client.channel.unary_unary(f"/jaxserve.v1.InferenceService/{method}")
    with pytest.raises(grpc.RpcError) as e:
        call(data, timeout=30, metadata=client.metadata)
    return e.value


@pytest.mark.parametrize("data", [
    b"\xff\xff\xff\xff",  # not a protobuf message
    b"\x12\x02\xc3\x28",  # field 2 (prompt): a string that is not UTF-8
], ids=["corrupt", "not-utf8"])
def test_undecodable_requests_are_invalid_argument(client, data):
    for method in ("GenerateUnary", "Tokenize"):
        error = _raw(client, method, data)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.details().startswith("request: cannot decode the message: ")
    assert client.model_info().num_running == 0  # and the server goes on serving
