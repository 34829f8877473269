"""TLS credentials, the bearer-token interceptor and the bind-address rule.

A server bound beyond loopback must have both TLS and a token, unless the operator says
`--insecure`. The health service is exempt from the token so load balancers can probe it.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc

from jaxserve.config import ServerSection
from jaxserve.errors import ConfigError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def check_bind_security(server: ServerSection, insecure: bool) -> None:
    """Refuse a non-loopback bind without TLS and a token, unless `insecure`."""
    if insecure or is_loopback(server.host):
        return
    missing = [what for what, ok in (("TLS (server.tls_cert and server.tls_key)",
                                      server.tls_cert is not None),
                                     ("bearer token (server.auth_token)",
                                      bool(server.auth_token))) if not ok]
    if missing:
        raise ConfigError(
            f"server.host={server.host!r} is not a loopback address and the server has no "
            f"{' and no '.join(missing)}; configure them, or pass --insecure to serve "
            f"without them")


def check_ports_free(server: ServerSection) -> None:
    """ConfigError naming the key when the gRPC or metrics port is taken: checked before
    the model loads, so a clash costs a second, not a load and a traceback."""
    for key, port in (("server.port", server.port), ("server.metrics_port",
                                                     server.metrics_port)):
        if not port:
            continue  # 0 picks a free port; None turns the endpoint off
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((server.host.strip("[]"), port))
            except OSError as e:
                raise ConfigError(f"{key}={port}: cannot listen on {server.host}:{port} "
                                  f"({e.strerror or e}); is another server running there?"
                                  ) from None


def server_credentials(server: ServerSection) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None for plaintext."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    pem, paths = {}, {}
    for key in ("tls_cert", "tls_key"):
        path = paths[key] = Path(getattr(server, key)).expanduser()
        if not path.is_file():
            raise ConfigError(f"server.{key}: {path} not found")
        pem[key] = path.read_bytes()
    # gRPC reads the pair only when the server binds, after the model has loaded, and says
    # no more than that it could not bind: load it here, where the error can name it.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths["tls_cert"],
                                                                paths["tls_key"])
    except ssl.SSLError as e:
        raise ConfigError(f"server.tls_cert / server.tls_key: {paths['tls_cert']} and "
                          f"{paths['tls_key']} are not a PEM certificate and its private "
                          f"key ({e.reason or e})") from None
    return grpc.ssl_server_credentials([(pem["tls_key"], pem["tls_cert"])])


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless the call carries `authorization: Bearer <token>`."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None):
        self._token = token.encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        given = bearer_token(handler_call_details.invocation_metadata)
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            return handler
        if self._on_reject is not None:
            self._on_reject(method)
        return _rejecting(handler)


async def _unauthenticated(_request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid bearer token (metadata authorization: Bearer ...)")


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only rejects, without deserializing the
    request: nothing of an unauthenticated caller's message is parsed."""
    kwargs = dict(request_deserializer=None,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_unauthenticated, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_unauthenticated, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_unauthenticated, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_unauthenticated, **kwargs)
