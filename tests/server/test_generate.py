"""Generation over gRPC against the offline engine, plus the tokenizer and info RPCs,
health, reflection, metrics, `jaxserve client` and `jaxserve bench serve`."""

import asyncio
import dataclasses
import json
import socket
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxserve import cli
from jaxserve.engine.request import FinishReason, SamplingParams
from jaxserve.errors import JaxserveError
from jaxserve.server.bench_serve import BenchConfig, Result, request_lengths, synthetic_rows
from jaxserve.server.client import AsyncClient, Client
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.protocol import FINISH_NAMES, make_request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    [1, 504, 2988, 288, 451],  # token ids
]
CHAT = "What is 2+2?"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def served(server_config, start_server, unused_port):
    """(thread, port, health statuses seen before and after warm-up, and the exit codes of
    `jaxserve client --health` then)."""
    config = server_config.replace(server__metrics_port=unused_port())
    probe = ["client", "--port", None, "--health"]
    with start_server(config, warm_up=False) as (thread, port):
        probe[2] = str(port)
        with Client("127.0.0.1", port) as client:
            before, probe_before = client.health(), cli.main(probe)
            thread.run(thread.server.warm_up())
            after, probe_after = client.health(), cli.main(probe)
        yield thread, port, (before, after), (probe_before, probe_after)


@pytest.fixture(scope="module")
def client(served):
    with Client("127.0.0.1", served[1]) as c:
        yield c


@pytest.fixture(scope="module")
def offline(demo_llm):
    """Offline greedy completions of PROMPTS and of CHAT, one prompt at a time (so the
    server, also sent one at a time, runs the same shapes)."""
    outs = [demo_llm.generate([p], GREEDY)[0] for p in PROMPTS]
    return outs, demo_llm.generate([CHAT], GREEDY, chat=True)[0]


def _collect(chunks):
    text, ids, last = [], [], None
    for chunk in chunks:
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    return "".join(text), ids, last


def _same(completion, text, ids, last):
    assert ids == completion.token_ids
    assert text == completion.text
    assert FINISH_NAMES[last.finish_reason] == completion.finish_reason.value
    assert last.usage.prompt_tokens == len(completion.prompt_token_ids)
    assert last.usage.completion_tokens == len(completion.token_ids)


def test_health_goes_not_serving_to_serving(served):
    assert served[2] == (health_pb2.HealthCheckResponse.NOT_SERVING,
                         health_pb2.HealthCheckResponse.SERVING)
    assert served[3] == (1, 0)  # `client --health` as a probe: 1 unless SERVING


def test_reflection_lists_services(served):
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in reply.list_services_response.service}
    assert {"jaxserve.v1.InferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_streaming_matches_offline(client, offline):
    outs, chat = offline
    for prompt, completion in zip(PROMPTS, outs, strict=True):
        chunks = list(client.generate(prompt, GREEDY))
        assert len(chunks) > 1  # really streamed
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        _same(completion, *_collect(chunks))
    _same(chat, *_collect(client.generate(CHAT, GREEDY, chat=True)))


def test_unary_matches_offline(client, offline):
    outs, chat = offline
    for prompt, completion in zip(PROMPTS, outs, strict=True):
        r = client.generate_unary(prompt, GREEDY, request_id="unary-1")
        assert r.request_id == "unary-1"
        _same(completion, r.text, list(r.token_ids), r)
    r = client.generate_unary([{"role": "user", "content": CHAT}], GREEDY)
    _same(chat, r.text, list(r.token_ids), r)


def test_sampling_options_reach_the_engine(client, demo_llm):
    """A seeded sampled request with every option gives the offline engine's tokens."""
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40, min_p=0.02,
                            repetition_penalty=1.2, presence_penalty=0.3,
                            frequency_penalty=0.2, seed=1234, min_tokens=3,
                            stop_token_ids=(17,), logprobs=3)
    expected = demo_llm.generate([PROMPTS[0]], params)[0]
    text, ids, last = _collect(client.generate(PROMPTS[0], params))
    _same(expected, text, ids, last)


def test_logprobs_and_stop_string(client, demo_llm):
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    expected = demo_llm.generate([PROMPTS[1]], params)[0]
    chunks = list(client.generate(PROMPTS[1], params))
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == expected.token_ids
    for got, want in zip(logprobs, expected.logprobs, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t.token_id for t in got.top] == [t for t, _ in want.top]
    # a stop string cut from the greedy text ends generation there, never included
    full = expected.text
    stop = full[len(full) // 2:][:3]
    stopped = SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,))
    text, _, last = _collect(client.generate(PROMPTS[1], stopped))
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert text == full[:full.index(stop)]


def test_64_concurrent_streams_complete(served, client):
    baseline = client.model_info().kv_pages_used
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def one(c, i):
        ids = []
        async for chunk in c.generate(make_request(f"Request number {i}:", params=params)):
            ids.extend(chunk.token_ids)
            last = chunk
        return ids, last

    async def run():
        async with AsyncClient("127.0.0.1", served[1]) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for ids, last in results:
        assert len(ids) == 4
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 4
    info = client.model_info()
    assert (info.kv_pages_used, info.num_running, info.num_waiting) == (baseline, 0, 0)


def test_tokenize_detokenize_and_model_info(client, demo_model, demo_config):
    tok = demo_model.tokenizer
    assert client.tokenize("Hello world") == tok.encode("Hello world")
    assert client.detokenize(tok.encode("Hello world")) == "Hello world"
    chat = client.stub.Tokenize(pb.TokenizeRequest(
        messages=[pb.ChatMessage(role="user", content=CHAT)]))
    assert list(chat.token_ids) == tok.encode_chat([{"role": "user", "content": CHAT}])
    info = client.model_info()
    assert info.model_name == demo_config.model.name
    assert info.vocab_size == demo_model.model_config.vocab_size
    assert info.context_length == demo_config.cache.max_model_len
    assert info.page_size == demo_config.cache.page_size
    assert list(info.token_buckets) == list(demo_config.runner.token_buckets)
    assert dict(info.mesh) == {"data": 1, "pipeline": 1, "tensor": 1, "expert": 1}
    assert info.kv_pages_total == info.kv_pages_used + info.kv_pages_free > 0
    assert info.has_chat_template


def test_metrics_endpoint(served, client):
    list(client.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0)))
    port = served[0].server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = body.decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples["jaxserve_generated_tokens_total"] >= 3
    assert samples['jaxserve_requests_total{code="OK",method="Generate"}'] >= 1
    assert samples["jaxserve_time_to_first_token_seconds_count"] >= 1
    assert samples["jaxserve_request_latency_seconds_count"] >= 1
    for name in ("jaxserve_time_per_output_token_seconds_count", "jaxserve_queue_depth",
                 "jaxserve_running_requests", "jaxserve_kv_pages_used",
                 "jaxserve_kv_pages_free", "jaxserve_preemptions_total",
                 "jaxserve_compilations_total"):
        assert name in samples, name
    assert samples["jaxserve_kv_pages_free"] > 0


def test_a_busy_metrics_port_is_a_clear_error(server_config, start_server, unused_port):
    port = unused_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(JaxserveError, match=rf"server.metrics_port: cannot bind "
                                                rf"127.0.0.1:{port}: Address already in use"):
            with start_server(server_config.replace(server__metrics_port=port),
                              warm_up=False):
                pass


def test_client_command_streams_the_completion(served, offline, capsys):
    outs, _ = offline
    code = cli.main(["client", "--port", str(served[1]), "--prompt", PROMPTS[0],
                     "--max-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == outs[0].text + "\n"
    assert f"--- [{outs[0].finish_reason.value}, 8 tokens" in captured.err


def test_client_command_tokenizes_detokenizes_and_reports(served, client, capsys):
    port = str(served[1])
    ids = client.tokenize("Hello world")
    assert cli.main(["client", "--port", port, "--tokenize", "Hello world"]) == 0
    assert capsys.readouterr().out == " ".join(map(str, ids)) + "\n"
    assert cli.main(["client", "--port", port, "--detokenize", " ".join(map(str, ids))]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert cli.main(["client", "--port", port, "--health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert cli.main(["client", "--port", port, "--info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modelName"] == client.model_info().model_name
    assert info["numRunning"] == 0 and info["numWaiting"] == 0  # zeros are printed too
    assert cli.main(["client", "--port", port, "--detokenize", "1 two"]) == 2
    assert "--detokenize '1 two': expected token ids" in capsys.readouterr().err


def test_health_probe_without_a_server_exits_1(unused_port, capsys):
    assert cli.main(["client", "--port", str(unused_port()), "--health", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_client_command_reports_errors(served, capsys):
    code = cli.main(["client", "--port", str(served[1]), "--prompt", "x",
                     "--temperature", "-1"])  # refused before it is sent
    assert code == 2
    assert "error: temperature: must be >= 0 (got -1.0)" in capsys.readouterr().err
    assert cli.main(["client", "--port", str(served[1]), "--prompt", "x",
                     "--stop-token-id", "-4"]) == 2
    assert "--stop-token-id: -4 is negative" in capsys.readouterr().err
    code = cli.main(["client", "--port", str(served[1]), "--prompt", "x",
                     "--max-tokens", "100000"])  # the server's context: its answer
    assert code == 2
    assert "INVALID_ARGUMENT: sampling.max_tokens: " in capsys.readouterr().err


def test_bench_serve_concurrency_and_rate(served, tmp_path, capsys):
    out = tmp_path / "closed.json"
    code = cli.main(["bench", "serve", "--port", str(served[1]), "--concurrency", "4",
                     "--num-requests", "8", "--input-len", "8", "--output-len", "3",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 8 and report["errors"] == {}
    assert report["total_output_tokens"] == 8 * 3
    assert report["total_input_tokens"] == 8 * 8
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s"):
        assert report[key]["p50"] is not None and report[key]["p99"] >= report[key]["p50"]
    assert "TTFT" in capsys.readouterr().out

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Hello"}\n'
                       '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}\n')
    out = tmp_path / "open.json"
    assert cli.main(["bench", "serve", "--port", str(served[1]), "--rate", "20",
                     "--num-requests", "4", "--output-len", "2", "--dataset", str(dataset),
                     "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 4 and report["config"]["rate"] == 20


def test_bench_serve_lognormal_sweep_replays_its_saved_requests(served, client, tmp_path,
                                                                capsys):
    saved, out = tmp_path / "requests.jsonl", tmp_path / "sweep.json"
    assert cli.main(["bench", "serve", "--port", str(served[1]), "--rate", "40", "80",
                     "--num-requests", "6", "--input-len", "12", "--output-len", "3",
                     "--lengths", "lognormal", "--save-requests", str(saved),
                     "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    cfg = BenchConfig(rate=40, num_requests=6, input_len=12, output_len=3, lengths="lognormal")
    context = client.model_info().context_length
    assert [(len(r["token_ids"]), r["max_tokens"]) for r in rows] == request_lengths(cfg,
                                                                                     context)
    assert all(r["ignore_eos"] for r in rows)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serve-sweep" and report["rates"] == [40, 80]
    for run, rate in zip(report["runs"], (40, 80), strict=True):
        assert run["config"]["rate"] == rate and run["completed"] == 6 and not run["errors"]
        assert run["total_input_tokens"] == sum(len(r["token_ids"]) for r in rows)
        assert run["total_output_tokens"] == sum(r["max_tokens"] for r in rows)
    assert "out tok/s" in capsys.readouterr().out  # the sweep's table

    again = tmp_path / "again.json"  # the saved file is a dataset: the same work again
    assert cli.main(["bench", "serve", "--port", str(served[1]), "--concurrency", "3",
                     "--num-requests", "6", "--dataset", str(saved), "--out", str(again),
                     "--no-progress"]) == 0
    replay = json.loads(again.read_text())
    assert replay["total_output_tokens"] == report["runs"][0]["total_output_tokens"]
    assert replay["total_input_tokens"] == report["runs"][0]["total_input_tokens"]


def test_a_sweeps_later_rates_do_not_find_their_prompts_in_the_prefix_cache(served, tmp_path):
    """Each rate sends random prompts of the same lengths but new token ids; a dataset is
    the same each time, and the report counts the prompt tokens the cache served."""
    saved, out = tmp_path / "requests.jsonl", tmp_path / "sweep.json"
    assert cli.main(["bench", "serve", "--port", str(served[1]), "--rate", "50", "50",
                     "--num-requests", "3", "--input-len", "40", "--output-len", "2",
                     "--seed", "7", "--save-requests", str(saved), "--out", str(out),
                     "--no-progress"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["total_input_tokens"] for r in runs] == [120, 120]
    assert [r["total_cached_input_tokens"] for r in runs] == [0, 0]
    again = tmp_path / "again.json"  # the first rate's prompts: two full pages each cached
    assert cli.main(["bench", "serve", "--port", str(served[1]), "--concurrency", "3",
                     "--num-requests", "3", "--dataset", str(saved), "--out", str(again),
                     "--no-progress"]) == 0
    assert json.loads(again.read_text())["total_cached_input_tokens"] == 3 * 32
    cfg = BenchConfig(rate=1, num_requests=3, input_len=40, output_len=2, seed=7)
    first, second = (synthetic_rows(dataclasses.replace(cfg, prompt_round=i), 1000, 100)
                     for i in (0, 1))
    assert [len(r["token_ids"]) for r in first] == [len(r["token_ids"]) for r in second]
    assert all(a["token_ids"] != b["token_ids"] for a, b in zip(first, second, strict=True))


def test_tpot_counts_the_tokens_after_the_first_chunk():
    # 1 token, then 2 chunks of 4 tokens 0.1 s apart each: 8 tokens in 0.2 s after the first
    r = Result("OK", 0.0, chunk_times=[1.0, 1.1, 1.2], output_tokens=9, first_chunk_tokens=1)
    assert r.tpot == pytest.approx(0.2 / 8)
    assert r.ttft == 1.0
    # every token in the first chunk: nothing after it was timed, so no TPOT (not 0)
    assert Result("OK", 0.0, chunk_times=[1.0], output_tokens=5, first_chunk_tokens=5).tpot \
        is None
    assert Result("OK", 0.0, chunk_times=[1.0], output_tokens=1, first_chunk_tokens=1).tpot \
        is None
    assert Result("UNAVAILABLE", 0.0).tpot is None


def test_lognormal_lengths_have_the_asked_means_and_fit_the_context():
    cfg = BenchConfig(concurrency=1, num_requests=20000, input_len=1024, output_len=256,
                      lengths="lognormal")
    prompts, outputs = np.array(request_lengths(cfg, 10**7)).T
    assert abs(prompts.mean() / 1024 - 1) < 0.03 and abs(outputs.mean() / 256 - 1) < 0.03
    assert np.median(prompts) < 1024 and prompts.max() > 4 * 1024  # skewed, long tail
    prompts, outputs = np.array(request_lengths(cfg, 2048)).T
    assert prompts.min() >= 1 and outputs.min() >= 1 and (prompts + outputs).max() <= 2048
    fixed = BenchConfig(concurrency=1, num_requests=3, input_len=5, output_len=7)
    assert request_lengths(fixed, 2048) == [(5, 7)] * 3


@pytest.mark.parametrize("args, message", [
    (["--rate", "5", "0"], "--rate: must be > 0"),
    (["--rate", "5", "--lengths", "lognormal", "--length-sigma", "0"], "--length-sigma"),
    (["--rate", "5", "--dataset", "x.jsonl", "--save-requests", "y.jsonl"], "--save-requests"),
])
def test_bench_serve_rejects_bad_options_before_sending(args, message, capsys):
    assert cli.main(["bench", "serve", "--port", "1", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("row, message", [
    ('{"max_tokens": 3}', 'expected one of "prompt", "token_ids" or "messages"'),
    ('{"prompt": 5}', '"prompt" must be a non-empty string'),
    ('{"token_ids": ["a"]}', '"token_ids" must be a non-empty list of integers'),
    ('{"token_ids": [1.5]}', '"token_ids" must be a non-empty list of integers'),
    ('{"messages": "Say hi"}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}', '"messages" must be a non-empty list'),
    ('{"prompt": "x", "max_tokens": null}', '"max_tokens" must be an integer >= 1 (got None)'),
    ('{"prompt": "x", "max_tokens": "abc"}', '"max_tokens" must be an integer >= 1'),
    ('{"prompt": "x", "ignore_eos": "false"}', '"ignore_eos" must be true or false'),
], ids=["no-prompt", "prompt-int", "ids-str", "ids-float", "messages-str", "no-content",
        "max-null", "max-str", "eos-str"])
def test_bench_serve_dataset_rows_are_checked_field_by_field(tmp_path, row, message):
    from jaxserve.errors import JaxserveError
    from jaxserve.server.bench_serve import dataset_requests

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "fine"}\n' + row + "\n")
    with pytest.raises(JaxserveError) as e:
        dataset_requests(BenchConfig(concurrency=1, num_requests=2, dataset=str(path)))
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    path.write_text('{"token_ids": [5, 6], "max_tokens": 3, "ignore_eos": true}\n'
                    '{"prompt": "a\u2028b"}\n')  # a JSON string may hold U+2028 as it is
    first, second = dataset_requests(BenchConfig(concurrency=1, num_requests=2,
                                                 dataset=str(path)))
    assert list(first.token_ids) == [5, 6] and first.sampling.max_tokens == 3
    assert first.sampling.ignore_eos and second.prompt == "a\u2028b"


def test_bench_serve_writes_outside_the_source_tree_by_default(monkeypatch, tmp_path):
    from jaxserve.server.bench_serve import default_out

    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    assert default_out().parent == tmp_path / "bench"


def test_finish_reason_names_cover_the_engine():
    assert set(FINISH_NAMES.values()) == {r.value for r in FinishReason} - {"error"}
