"""Python clients for jaxserve.v1: `Client` (blocking) and `AsyncClient` (grpc.aio).

    with Client("127.0.0.1", 50051) as client:
        for chunk in client.generate("Hello", SamplingParams(max_tokens=32, temperature=0)):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.engine.request import SamplingParams
from jaxserve.errors import JaxserveError
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.proto import jaxserve_pb2_grpc as pb_grpc
from jaxserve.server.protocol import host_port, make_request

Prompt = str | list[int] | list[dict]


def channel_credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting the PEM bundle at `tls_ca` (None: plaintext)."""
    if tls_ca is None:
        return None
    path = Path(tls_ca).expanduser()
    if not path.is_file():
        raise JaxserveError(f"--tls-ca: {path} not found")
    return grpc.ssl_channel_credentials(root_certificates=path.read_bytes())


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _open_channel(grpc_module, host: str, port: int, tls_ca: str | None,
                  tls_server_name: str | None, max_message_bytes: int):
    """A channel of `grpc_module` (grpc, or grpc.aio): TLS with `tls_ca`, else plaintext."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    creds = channel_credentials(tls_ca)
    address = host_port(host, port)
    return (grpc_module.insecure_channel(address, options) if creds is None
            else grpc_module.secure_channel(address, creds, options))


class Client:
    """A blocking client; every call takes `timeout` seconds (None: no deadline)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, *, token: str | None = None,
                 tls_ca: str | None = None, tls_server_name: str | None = None,
                 max_message_bytes: int = 16 * 1024 * 1024):
        self.channel = _open_channel(grpc, host, port, tls_ca, tls_server_name,
                                     max_message_bytes)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = auth_metadata(token)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *,
                 chat: bool = False, request_id: str = "", priority: int = 0,
                 timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Stream a completion; raises grpc.RpcError on failure. Cancel with `.cancel()`."""
        request = make_request(prompt, params=params, chat=chat, request_id=request_id,
                               priority=priority)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def generate_unary(self, prompt: Prompt, params: SamplingParams | None = None, *,
                       chat: bool = False, request_id: str = "", priority: int = 0,
                       timeout: float | None = None) -> pb.GenerateResponse:
        request = make_request(prompt, params=params, chat=chat, request_id=request_id,
                               priority=priority)
        return self.stub.GenerateUnary(request, timeout=timeout, metadata=self.metadata)

    def tokenize(self, text: str, timeout: float | None = None) -> list[int]:
        response = self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=timeout,
                                      metadata=self.metadata)
        return list(response.token_ids)

    def detokenize(self, token_ids: list[int], timeout: float | None = None) -> str:
        response = self.stub.Detokenize(pb.DetokenizeRequest(token_ids=token_ids),
                                        timeout=timeout, metadata=self.metadata)
        return response.text

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                      metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = None) -> int:
        """The health status (health_pb2.HealthCheckResponse.SERVING, NOT_SERVING, ...)."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=timeout)
        return response.status

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The grpc.aio twin of Client; create it inside a running event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, *, token: str | None = None,
                 tls_ca: str | None = None, tls_server_name: str | None = None,
                 max_message_bytes: int = 16 * 1024 * 1024):
        self.channel = _open_channel(grpc.aio, host, port, tls_ca, tls_server_name,
                                     max_message_bytes)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.metadata = auth_metadata(token)

    def generate(self, request: pb.GenerateRequest,
                 timeout: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """The streaming call (async-iterable; `.cancel()` stops it)."""
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def generate_unary(self, request: pb.GenerateRequest,
                             timeout: float | None = None) -> pb.GenerateResponse:
        return await self.stub.GenerateUnary(request, timeout=timeout, metadata=self.metadata)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                            metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
