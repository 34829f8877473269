"""TLS and bearer-token auth accept and reject correctly; a non-loopback bind needs both
(or --insecure)."""

import dataclasses
import pathlib
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2

from jaxserve import cli
from jaxserve.config import ServerSection
from jaxserve.engine.request import SamplingParams
from jaxserve.errors import ConfigError
from jaxserve.server.client import Client
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.security import check_bind_security, is_loopback, server_credentials

TOKEN = "s3cret-token"
PARAMS = SamplingParams(max_tokens=2, temperature=0.0)
REPO_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "smollm2-135m-cpu.yaml"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def port(server_config, start_server, cert):
    config = server_config.replace(server=dataclasses.replace(
        server_config.server, tls_cert=str(cert[0]), tls_key=str(cert[1]), auth_token=TOKEN))
    with start_server(config) as (_, port):
        yield port


def _client(port, cert, token):
    return Client("127.0.0.1", port, tls_ca=str(cert[0]), token=token)


def test_tls_and_token_accepted(port, cert):
    with _client(port, cert, TOKEN) as c:
        reply = c.generate_unary("Hello", PARAMS, timeout=60)
        assert reply.usage.completion_tokens == 2
        assert sum(len(x.token_ids) for x in c.generate("Hello", PARAMS, timeout=60)) == 2
        assert c.model_info(timeout=10).vocab_size > 0


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no token", "wrong token"])
def test_bad_token_unauthenticated(port, cert, token):
    with _client(port, cert, token) as c:
        for call in (lambda: c.generate_unary("Hello", PARAMS, timeout=30),
                     lambda: list(c.generate("Hello", PARAMS, timeout=30)),
                     lambda: c.model_info(timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_scheme_unauthenticated(port, cert):
    with _client(port, cert, None) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30,
                                metadata=(("authorization", f"Basic {TOKEN}"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(port, cert):
    with _client(port, cert, None) as c:
        assert c.health(timeout=30) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_rejected_by_tls_server(port):
    with Client("127.0.0.1", port, token=TOKEN) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.model_info(timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_untrusted_server_cert_rejected(port, cert, tmp_path):
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(other)], check=True, capture_output=True)
    with Client("127.0.0.1", port, tls_ca=str(other), token=TOKEN) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.model_info(timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_bind_needs_tls_and_token(cert):
    tls = dict(tls_cert=str(cert[0]), tls_key=str(cert[1]))
    for section in (ServerSection(host="0.0.0.0"), ServerSection(host="0.0.0.0", **tls),
                    ServerSection(host="0.0.0.0", auth_token=TOKEN)):
        with pytest.raises(ConfigError, match="--insecure"):
            check_bind_security(section, insecure=False)
        check_bind_security(section, insecure=True)
    check_bind_security(ServerSection(host="0.0.0.0", auth_token=TOKEN, **tls), False)
    check_bind_security(ServerSection(host="127.0.0.1"), False)


def test_tls_files_that_are_not_a_pem_pair_are_named_before_loading(cert, tmp_path):
    """gRPC would read them only at the bind, after the model loads, and say it could not
    bind."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for tls_cert, tls_key in ((junk, cert[1]), (cert[0], junk), (cert[1], cert[0])):
        section = ServerSection(tls_cert=str(tls_cert), tls_key=str(tls_key))
        with pytest.raises(ConfigError, match=r"^server.tls_cert / server.tls_key: .* are not "
                                              r"a PEM certificate and its private key"):
            server_credentials(section)
    assert server_credentials(ServerSection(tls_cert=str(cert[0]), tls_key=str(cert[1])))


def test_serve_refuses_insecure_public_bind_before_loading(capsys):
    code = cli.main(["serve", "--config", str(REPO_CONFIG), "--host", "0.0.0.0"])
    assert code == 2
    assert "--insecure" in capsys.readouterr().err


def test_an_unauthenticated_call_is_refused_before_its_message_is_parsed(port, cert):
    with _client(port, cert, token=None) as client:
        call = client.channel.unary_unary("/jaxserve.v1.InferenceService/GenerateUnary")
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff\xff", timeout=30)  # garbage: never deserialized
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
