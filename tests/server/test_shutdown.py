"""Draining: health NOT_SERVING, new requests UNAVAILABLE, running ones finish within the
grace period (or are cut with UNAVAILABLE after it); `jaxserve serve` exits 0 on SIGTERM."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from jaxserve.engine.request import SamplingParams
from jaxserve.server.client import Client
from jaxserve.server.grpc_server import InferenceServer, ServerThread

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_drain_finishes_running_requests_and_refuses_new(server_config, demo_model, wait):
    thread = ServerThread(InferenceServer(server_config, demo_model))
    port = thread.start()
    client = Client("127.0.0.1", port)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    call = client.generate("Draining", params)
    first = next(call)
    drained = asyncio.run_coroutine_threadsafe(thread.server.shutdown(grace=60.0), thread.loop)
    try:
        wait(lambda: client.health(timeout=10) == NOT_SERVING, 30, what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as e:
            client.generate_unary("Too late", params, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)  # the running request finishes within the grace period
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 12
        drained.result(60)
    finally:
        client.close()
        thread.close()


def _write_config(demo_config, path, compilation_cache_dir="same"):
    c = demo_config
    cache_dir = c.runner.compilation_cache_dir if compilation_cache_dir == "same" \
        else compilation_cache_dir
    path.write_text(yaml.safe_dump({
        "model": {"name": c.model.name, "dtype": c.model.dtype},
        "checkpoint": {"source": c.checkpoint.source, "cache_dir": c.checkpoint.cache_dir},
        "cache": {"page_size": c.cache.page_size, "kv_cache_memory": 128 * 2**20,
                  "max_model_len": c.cache.max_model_len},
        "scheduler": {"max_num_seqs": c.scheduler.max_num_seqs,
                      "max_num_batched_tokens": c.scheduler.max_num_batched_tokens},
        "runner": {"token_buckets": list(c.runner.token_buckets),
                   "seq_buckets": list(c.runner.seq_buckets),
                   "compilation_cache_dir": cache_dir},
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None,
                   "grace_period_s": 1.0},
    }))


def _read_until(proc, pattern, lines, timeout=240):
    """Read the server's stdout until a line matches (bounded by a timer)."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(pattern, line):
                return m
    finally:
        timer.cancel()
    raise AssertionError(f"server exited before printing {pattern!r}: {''.join(lines)}")


def test_serve_command_sigterm_cuts_after_grace_and_exits_0(demo_config, tmp_path, wait):
    config = tmp_path / "serve.yaml"
    _write_config(demo_config, config)
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "serve", "--config",
                             str(config), "--port", "0", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    try:
        port = int(_read_until(proc, r"listening on 127\.0\.0\.1:(\d+)", lines)[1])
        _read_until(proc, r"health SERVING", lines)
        with Client("127.0.0.1", port) as client:
            assert client.health(timeout=10) == SERVING
            call = client.generate("Go on forever", SamplingParams(
                max_tokens=1000, temperature=0.0, ignore_eos=True), timeout=120)
            next(call)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as e:
                list(call)  # cut after the 1 s grace period
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in e.value.details()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert "draining" in err and "stopped" in err, err


def test_sigterm_during_warm_up_stops_it_between_programs(demo_config, tmp_path):
    """A stop while the programs compile (no compilation cache: each one compiles) ends
    warm-up after the program under way, not after all of them; the exit is still 0."""
    config = tmp_path / "serve.yaml"
    _write_config(demo_config, config, compilation_cache_dir=None)
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "serve", "--config",
                             str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    try:
        _read_until(proc, r"warming up", lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
    assert "warm-up stopped: the server is shutting down" in err, err
    assert "health SERVING" not in "".join(lines) + out
    done = [int(n) for n in re.findall(r"compiling buckets: +\d+%.*?\| *(\d+)/\d+", err)]
    total = int(re.search(r"compiling buckets: .*?/(\d+)", err)[1])
    assert max(done) < total, err  # it did not compile them all
