"""The command line, in-process: generate's JSON output and one-line errors with exit 2."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxserve import cli

GOLDEN = json.loads((pathlib.Path(__file__).parent / "fixtures" / "smollm2_golden.json")
                    .read_text())["cases"]
DEMO = pathlib.Path(__file__).parent.parent / "configs" / "smollm2-135m-cpu.yaml"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    cache = os.environ.get("JAXSERVE_CACHE_DIR", "~/.cache/jaxserve")
    text = DEMO.read_text().replace("  source: demo", f"  source: demo\n  cache_dir: {cache}")
    text = text.replace("  # compilation_cache_dir: <cache_dir>/xla   (default)",
                        f"  compilation_cache_dir: {cache}/xla-tests")
    buckets = "token_buckets: [1, 4, 16, 64, 128, 256, 512, 1024, 2048]"
    assert buckets in text
    text = text.replace(buckets, "token_buckets: [16, 64]")
    text = text.replace("seq_buckets: [1, 4, 16]", "seq_buckets: [4, 16]")
    text = text.replace("max_num_batched_tokens: 2048", "max_num_batched_tokens: 64")
    path = tmp_path_factory.mktemp("cfg") / "demo.yaml"
    path.write_text(text)
    return str(path)


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_matches_transformers_in_input_order(config_file, capsys, tmp_path):
    raw, chat = GOLDEN[0], GOLDEN[4]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": chat["text"]}]})
                     + "\n\n" + json.dumps({"prompt": raw["text"]}) + "\n")
    code, out, _ = run(capsys, "generate", "--config", config_file, "--prompt", raw["text"],
                       "--input", str(jsonl), "--max-tokens", "12", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    assert rows[0]["token_ids"] == raw["greedy_ids"][:12]
    assert rows[0]["prompt_token_ids"] == raw["prompt_ids"]
    assert rows[1]["token_ids"] == chat["greedy_ids"][:12]  # messages use the chat template
    assert rows[1]["prompt_token_ids"] == chat["prompt_ids"]
    assert rows[2]["token_ids"] == rows[0]["token_ids"]
    assert rows[0]["finish_reason"] == "length" and rows[0]["usage"]["completion_tokens"] == 12


def test_generate_chat_flag(config_file, capsys):
    case = GOLDEN[5]
    code, out, _ = run(capsys, "generate", "--config", config_file, "--prompt", case["text"],
                       "--chat", "--max-tokens", "8", "--json")
    assert code == 0
    assert json.loads(out)["token_ids"] == case["greedy_ids"][:8]


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", ""], "prompt: the prompt is empty"),
    (["--prompt", "word " * 2100], "prompt: the prompt has"),
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens: must be >= 1"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature: must be >= 0"),
    ([], "give at least one --prompt"),
])
def test_generate_bad_input_is_one_line_and_exit_2(config_file, capsys, args, message):
    code, out, err = run(capsys, "generate", "--config", config_file, *args)
    assert code == 2
    assert "Traceback" not in err
    # one line for the error (after the loading lines, when it comes from the model)
    assert message in err.splitlines()[-1] and err.count("generate: error") == 1


def test_a_bad_input_record_is_named_by_file_and_line(config_file, capsys, tmp_path):
    rows = tmp_path / "in.jsonl"
    for records, message in (
            (['{"prompt": "a"}', '{"prompt": "b", "max_tokens": 2}'],
             f"{rows}:2: expected {{\"prompt\": ...}} or {{\"messages\": [...]}} and no other "
             "key (got ['max_tokens', 'prompt'])"),
            (['{"prompt": 7}'], f"{rows}:1: prompt: expected text or a list of token ids (got "
                                "int)"),
            (['{"prompt": "a"}', '{"messages": [{"role": "user", "content": "' + "word " * 2100
              + '"}]}'], f"{rows}:2: prompt: the prompt has 2131 tokens"),
            (['{"prompt": "bad \\ud800"}'], f"{rows}:1: prompt: the text is not valid "
                                              "Unicode"),
            # Python's json raises ValueError and RecursionError for these, not a decode error
            (['{"prompt": [' + "7" * 5000 + "]}"], f"{rows}:1: JSON this reader cannot take: "
                                                   "Exceeds the limit"),
            (['{"prompt": ' + "[" * 100000 + "]" * 100000 + "}"],
             f"{rows}:1: JSON this reader cannot take: maximum recursion depth")):
        rows.write_text("\n".join(records) + "\n")
        code, _, err = run(capsys, "generate", "--config", config_file, "--prompt", "hi",
                           "--input", str(rows))
        assert code == 2 and "Traceback" not in err, err
        assert message in err.splitlines()[-1], err


def test_bad_files_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--config", str(tmp_path / "x.yaml"), "--prompt", "a")
    assert code == 2 and "config file not found" in err
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": 1}\n')
    code, _, err = run(capsys, "generate", "--config", str(DEMO), "--input", str(bad))
    assert code == 2 and f"{bad}:2:" in err
    code, _, err = run(capsys, "convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o"))
    assert code == 2 and "checkpoint not found" in err
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 10)
    code, _, err = run(capsys, "convert", str(fake), str(tmp_path / "o"))
    assert code == 2 and "fake.gguf" in err and "Traceback" not in err


@pytest.mark.parametrize("flag,key", [("--port", "server.port"),
                                      ("--metrics-port", "server.metrics_port")])
def test_serve_reports_a_busy_port_in_one_line_before_loading(tmp_path, capsys, flag, key):
    import socket

    config = tmp_path / "c.yaml"  # a source that does not exist: loading would fail loudly
    config.write_text("checkpoint:\n  source: /nonexistent/model.gguf\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        code = cli.main(["serve", "--config", str(config), flag, str(port), other, "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"jaxserve serve: error: {key}={port}: cannot listen on "
                          f"127.0.0.1:{port}"), err
    assert len(err.splitlines()) == 1


def test_a_bad_flag_value_is_named_as_the_flag_not_blamed_on_the_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("checkpoint:\n  source: /nonexistent/model.gguf\n")
    code = cli.main(["serve", "--config", str(config), "--port", "70000"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"jaxserve serve: error: {config} with --port 70000: server.port: must "
                   "be in [0, 65535] (got 70000)"), err
    code = cli.main(["serve", "--config", str(config), "--num-processes", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{config} with --num-processes 0: distributed." in err, err


def test_generate_checks_its_input_before_loading_the_model(capsys, tmp_path):
    config = tmp_path / "c.yaml"  # loading would fail: each error below must come first
    config.write_text("checkpoint:\n  source: /nonexistent/model.gguf\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for args, message in (
            (["--input", str(latin1)], f"{latin1}:2: not UTF-8 text (byte 32: b'\\xe9')"),
            (["--input", str(empty)], f"{empty}: no prompts in it"),
            (["--prompt", "hi", "--temperature", "-1"], "temperature: must be >= 0"),
            (["--prompt", "hi", "--max-tokens", "0"], "max_tokens: must be >= 1")):
        code, _, err = run(capsys, "generate", "--config", str(config), *args)
        assert code == 2, err
        assert message in err and err.count("\n") == 1, err


def test_generate_json_reports_speculation(config_file, capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(pathlib.Path(config_file).read_text()
                    + "speculative:\n  method: ngram\n  num_tokens: 4\n")
    prompt = "The cat sat on the mat. The dog sat on the log. " * 3 + "The cat sat on the"
    rows = []
    for cfg in (config_file, str(spec)):
        code, out, _ = run(capsys, "generate", "--config", cfg, "--prompt", prompt,
                           "--max-tokens", "16", "--temperature", "0", "--json")
        assert code == 0
        rows.append(json.loads(out))
    plain, speculative = rows
    assert speculative["token_ids"] == plain["token_ids"]
    assert "draft_tokens" not in plain["usage"]
    usage = speculative["usage"]
    assert usage["accepted_tokens"] >= 8 and usage["draft_tokens"] >= usage["accepted_tokens"]
    assert usage["mean_accepted_length"] > 2


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hi", "--seed", "99999999999999999999"], "seed: must be in [0, 2**32)"),
    (["--prompt", "hi", "--priority", "99999999999"],
     "--priority: 99999999999 is outside the 32-bit range"),
    (["--detokenize", "1 99999999999999999999"], "token ids are in [0, 2147483648)"),
    (["--prompt", "hi", "--max-tokens", "3000000000"],
     "--max-tokens: 3000000000 is outside the 32-bit range"),
    (["--prompt", "hi", "--top-k", "3000000000"], "--top-k: 3000000000 is outside the 32-bit"),
    (["--prompt", "hi", "--min-tokens", "-3000000000"], "--min-tokens: -3000000000 is outside"),
    (["--prompt", "hi", "--stop-token-id", "3000000000"], "--stop-token-id: 3000000000 is "),
    (["--prompt", "hi", "--temperature", "1e300"], "--temperature: 1e+300 does not fit a "
                                                   "32-bit float"),
    (["--prompt", "caf\udce9"], "--prompt: not UTF-8 text (bytes b'\\xe9' at character 3)"),
    (["--tokenize", "caf\udce9"], "--tokenize: not UTF-8 text"),
    (["--prompt", "hi", "--stop", "\udcff"], "--stop: not UTF-8 text (bytes b'\\xff'"),
    (["--info", "--timeout", "0"], "--timeout: must be > 0 seconds (got 0.0)"),
], ids=["seed", "priority", "detokenize", "max-tokens", "top-k", "min-tokens", "stop-token-id",
        "temperature", "prompt-not-utf8", "tokenize-not-utf8", "stop-not-utf8", "timeout"])
def test_client_refuses_numbers_its_request_cannot_hold(capsys, args, message):
    """Checked before any connection (port 1 has no server): one line, exit 2. (Bytes the
    shell passes that are not UTF-8 reach argv as surrogates, as in these strings.)"""
    code, _, err = run(capsys, "client", "--port", "1", *args)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["client", "--info"],
                                     ["bench", "serve", "--concurrency", "1"]])
@pytest.mark.parametrize("port", ["99999", "-5", "0", "x"])
def test_a_port_outside_1_to_65535_is_refused_not_dialled_modulo_65536(capsys, command,
                                                                         port):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--port", port])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --port:" in err and "Traceback" not in err


def test_bench_serve_refuses_files_it_could_not_write_before_sending(capsys, tmp_path):
    """Port 1 has no server: each refusal comes before any connection is tried."""
    bench = ["bench", "serve", "--port", "1", "--concurrency", "1"]
    code, _, err = run(capsys, *bench, "--out", str(tmp_path))
    assert code == 2 and f"--out: {tmp_path} is a directory" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, *bench, "--out", str(tmp_path / "r.json"),
                       "--save-requests", str(blocker / "requests.jsonl"))
    assert code == 2 and f"--save-requests: cannot create {blocker}" in err
    code, _, err = run(capsys, *bench, "--timeout", "-1")
    assert code == 2 and "--timeout: must be > 0 seconds (got -1.0)" in err


def test_generate_input_rows_of_token_ids_must_be_integers(config_file, capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": [504.9, 3575.7]}\n')
    code, _, err = run(capsys, "generate", "--config", config_file, "--input", str(rows))
    assert code == 2 and "token_ids: token ids must be integers (got 504.9)" in err


def test_generate_reports_a_failed_prompt_and_exits_1(config_file, capsys, monkeypatch):
    from jaxserve.engine.engine import Engine

    append = Engine._append

    def faulty(self, tracked, token, logprob):
        if tracked.request.request_id.endswith("1"):
            raise RuntimeError("injected fault")
        return append(self, tracked, token, logprob)

    monkeypatch.setattr(Engine, "_append", faulty)
    code, out, err = run(capsys, "generate", "--config", config_file, "--json",
                         "--prompt", "Hello", "--prompt", "Bye", "--max-tokens", "3")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "generate: 1 of 2 prompts failed" in err
    assert rows[0]["finish_reason"] == "length" and "error" not in rows[0]
    assert rows[1]["finish_reason"] == "error"
    assert rows[1]["error"] == "RuntimeError: injected fault"


def test_python_dash_m_runs_the_same_command_line(tmp_path):
    """`python -m jaxserve` is the `jaxserve` command: same parser, same exit codes."""
    ok = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--help"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("usage: jaxserve serve")
    bad = subprocess.run([sys.executable, "-m", "jaxserve", "generate", "--config",
                          str(tmp_path / "missing.yaml"), "--prompt", "a"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr
