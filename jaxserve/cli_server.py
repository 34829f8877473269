"""CLI commands of the serving side: serve, client, bench serve."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from jaxserve import launch
from jaxserve.errors import ConfigError, JaxserveError

TOKEN_ENV = "JAXSERVE_TOKEN"


def add_commands(sub, add_sampling_args, sampling_params) -> None:
    """Register the serve, client and bench subcommands."""
    p = sub.add_parser("serve", help="serve the model over gRPC")
    p.add_argument("--config", required=True)
    p.add_argument("--host", help="bind address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: server.port; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus port (default: server.metrics_port; 0 turns the endpoint off)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without TLS and a bearer token")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    launch.add_distributed_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="talk to a running server: stream a completion, or "
                                      "tokenize, detokenize, model info, health")
    _add_connection_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="stream a completion of this prompt")
    what.add_argument("--tokenize", metavar="TEXT", help="print the token ids of TEXT")
    what.add_argument("--detokenize", metavar="IDS", help='print the text of "1 2 3"')
    what.add_argument("--info", action="store_true", help="print the model and engine figures")
    what.add_argument("--health", action="store_true",
                      help="print the health status; exit 1 unless SERVING, or when "
                           "no server answers (a probe)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    add_sampling_args(p)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop-token-id", type=int, action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=lambda args: cmd_client(args, sampling_params))

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench",
                                                                     required=True)
    p = bench.add_parser("serve", help="load generator against a running server")
    _add_connection_args(p)
    p.add_argument("--rate", type=float, nargs="+",
                   help="requests per second (Poisson arrivals); several rates: a sweep")
    p.add_argument("--concurrency", type=int, help="requests in flight at most")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128,
                   help="random prompt tokens (their mean with --lengths lognormal)")
    p.add_argument("--output-len", type=int, default=128,
                   help="tokens to generate (their mean with --lengths lognormal)")
    p.add_argument("--lengths", choices=["fixed", "lognormal"], default="fixed",
                   help="random prompt and output lengths: all equal, or log-normal")
    p.add_argument("--length-sigma", type=float, default=1.0,
                   help="lognormal: the sigma of ln(length) (default 1.0)")
    p.add_argument("--save-requests", metavar="JSONL",
                   help="write the random requests as a --dataset file (for a peer's run)")
    p.add_argument("--dataset", help='JSONL of {"prompt"|"token_ids"|"messages", '
                                     '"max_tokens"?, "ignore_eos"?} instead of random prompts')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline (s)")
    p.add_argument("--out", help="JSON report (default: <cache dir>/bench/serve-<time>.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_serve)


def _port(text: str) -> int:
    """A server's port: an int in [1, 65535] (gRPC would dial another port for one outside
    it, taken modulo 65536)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside [1, 65535]")
    return port


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=50051)
    p.add_argument("--token", help=f"bearer token; ${TOKEN_ENV} when not given")
    p.add_argument("--tls-ca", help="PEM file of the CA that signed the server's cert: "
                                    "use TLS")
    p.add_argument("--tls-server-name", help="the name the server's cert is checked for "
                                             "(default: --host)")


def cmd_serve(args) -> int:
    import asyncio

    from jaxserve.config import load_config
    from jaxserve.loader import load_model
    from jaxserve.server.grpc_server import EXIT_PEER_LOST, serve
    from jaxserve.server.security import (
        check_bind_security,
        check_ports_free,
        server_credentials,
    )

    config = load_config(args.config)
    overrides = {f"server__{k}": getattr(args, k) for k in ("host", "port", "metrics_port")
                 if getattr(args, k) is not None}
    try:
        config = config.replace(**overrides)
    except ValueError as e:  # name the flags: the file alone may be fine
        flags = " ".join(f"--{k.split('__')[1].replace('_', '-')} {v}"
                         for k, v in overrides.items())
        raise ConfigError(f"{args.config} with {flags}: server.{e}") from None
    config = launch.with_distributed_args(config, args, args.config)
    progress = not args.no_progress
    # Every process refuses an unsafe bind before joining (the processes share their
    # arguments): a leader that left alone would take the coordinator with it.
    check_bind_security(config.server, args.insecure)
    if not launch.join(config):  # a follower: no gRPC, the leader's steps until it stops
        return launch.follow(config, progress)
    server_credentials(config.server)  # before the slow part
    check_ports_free(config.server)
    model = load_model(config, progress=progress)
    code = asyncio.run(serve(config, model, insecure=args.insecure, progress=progress))
    if code == EXIT_PEER_LOST:  # the engine thread may be stuck in a collective: leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_client(args, sampling_params) -> int:
    import grpc

    from jaxserve.server.protocol import FINISH_NAMES

    _check_texts(args)
    if args.timeout is not None and not args.timeout > 0:
        raise JaxserveError(f"--timeout: must be > 0 seconds (got {args.timeout})")
    if args.prompt is None:
        with _connect(args) as client:
            try:
                answer = _client_query(client, args)
            except grpc.RpcError as e:
                if args.health:  # a probe: no answer is not SERVING either
                    print(f"jaxserve: {e.code().name}: {e.details()}", file=sys.stderr)
                    return 1
                raise JaxserveError(f"{e.code().name}: {e.details()}") from None
        print(answer)
        return 1 if args.health and answer != "SERVING" else 0  # a probe's exit code

    params = dataclasses.replace(
        sampling_params(args), min_tokens=args.min_tokens,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos)
    # What the request's own fields cannot hold is refused here, naming the option (the
    # server checks the rest, against its model).
    if any(t < 0 for t in args.stop_token_id):
        raise JaxserveError(f"--stop-token-id: {min(args.stop_token_id)} is negative; token "
                            "ids are >= 0")
    for flag in ("max_tokens", "top_k", "min_tokens", "priority"):
        value = getattr(args, flag)
        if not -INT32_LIMIT <= value < INT32_LIMIT:
            raise JaxserveError(f"--{flag.replace('_', '-')}: {value} is outside the 32-bit "
                                "range")
    if any(t >= INT32_LIMIT for t in args.stop_token_id):
        raise JaxserveError(f"--stop-token-id: {max(args.stop_token_id)} is outside the "
                            "32-bit range")
    for flag in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = getattr(args, flag)
        if math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise JaxserveError(f"--{flag.replace('_', '-')}: {value} does not fit a 32-bit "
                                "float")
    params.validate(vocab_size=INT32_LIMIT, max_logprobs=INT32_LIMIT)
    last = None
    with _connect(args) as client:
        try:
            for chunk in client.generate(args.prompt, params, chat=args.chat,
                                         priority=args.priority, timeout=args.timeout):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except grpc.RpcError as e:
            print(file=sys.stdout)
            raise JaxserveError(f"{e.code().name}: {e.details()}") from None
    print()
    if last is not None:
        u = last.usage
        print(f"--- [{FINISH_NAMES.get(last.finish_reason, 'unknown')}, "
              f"{u.completion_tokens} tokens; prompt {u.prompt_tokens}, "
              f"cached {u.cached_tokens}"
              + (f", speculative {u.accepted_tokens}/{u.draft_tokens} accepted"
                 if u.draft_tokens else "") + "]", file=sys.stderr)
    return 0


INT32_LIMIT = 2**31  # the proto's int32 fields hold [-2**31, 2**31)
FLOAT32_MAX = 3.4028234663852886e38  # its float fields: larger values become inf


def _check_texts(args) -> None:
    """Text options travel as UTF-8: one that is not (bytes the shell passed that do not
    decode, held as surrogates) is named here, not met as an encoder's traceback."""
    for flag in ("prompt", "tokenize", "stop"):
        values = getattr(args, flag, None)
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = value[e.start:e.end].encode("utf-8", "surrogateescape")
                raise JaxserveError(f"--{flag}: not UTF-8 text (bytes {bad!r} at character "
                                    f"{e.start})") from None


def _token(args) -> str | None:
    return args.token or os.environ.get(TOKEN_ENV)


def _connect(args):
    """A Client for the connection options (_add_connection_args)."""
    from jaxserve.server.client import Client

    return Client(args.host, args.port, token=_token(args), tls_ca=args.tls_ca,
                  tls_server_name=args.tls_server_name)


def _client_query(client, args) -> str:
    """The answer to --tokenize, --detokenize, --info or --health, as printed text."""
    from google.protobuf import json_format
    from grpc_health.v1 import health_pb2

    if args.tokenize is not None:
        return " ".join(map(str, client.tokenize(args.tokenize, timeout=args.timeout)))
    if args.detokenize is not None:
        try:
            ids = [int(t) for t in args.detokenize.replace(",", " ").split()]
        except ValueError:
            raise JaxserveError(f"--detokenize {args.detokenize!r}: expected token ids such "
                                'as "1 2 3"') from None
        if any(not 0 <= t < INT32_LIMIT for t in ids):
            raise JaxserveError(f"--detokenize {args.detokenize!r}: token ids are in "
                                f"[0, {INT32_LIMIT})")
        return client.detokenize(ids, timeout=args.timeout)
    if args.info:
        return json_format.MessageToJson(client.model_info(timeout=args.timeout),
                                         always_print_fields_with_no_presence=True)
    status = client.health(timeout=args.timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def cmd_bench_serve(args) -> int:
    from jaxserve.server.bench_serve import BenchConfig, run

    rates = args.rate or []
    cfg = BenchConfig(host=args.host, port=args.port, token=_token(args), tls_ca=args.tls_ca,
                      tls_server_name=args.tls_server_name,
                      rate=rates[0] if rates else None, concurrency=args.concurrency,
                      num_requests=args.num_requests, input_len=args.input_len,
                      output_len=args.output_len, lengths=args.lengths,
                      length_sigma=args.length_sigma, dataset=args.dataset,
                      save_requests=args.save_requests, seed=args.seed,
                      timeout_s=args.timeout, progress=not args.no_progress)
    run(cfg, args.out, rates)
    return 0
