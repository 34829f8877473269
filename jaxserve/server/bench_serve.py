"""`jaxserve bench serve`: a load generator over gRPC.

Requests arrive as a Poisson process (`rate` per second) or as `concurrency` clients that
each send the next request when the last one ends (both: Poisson arrivals, at most
`concurrency` in flight). Several rates make a sweep: one run per rate, one after the
other, to find where the server saturates. Each run sends requests of the same lengths,
arrival gaps and parameters; random prompts get new token ids in each run (the server's
prefix cache would otherwise hold most of the later runs' prompts, and their TTFT would
measure cache hits).
A dataset's prompts are the same in every run: the report's `total_cached_input_tokens`
(the prompt tokens the server took from its prefix cache, from each response's usage)
shows how much of a run that is.

Prompts are random token ids, generated with ignore_eos, or rows of a JSONL dataset. The
random lengths are `input_len` prompt tokens and `output_len` generated tokens each, or
with `lengths="lognormal"` drawn per request from log-normal distributions whose means are
`input_len` and `output_len`: length = round(exp(N(ln(mean) - sigma^2 / 2, sigma^2))),
at least 1, prompt and output together within the model's context. With sigma 1 and means
1024 / 256, half the prompts are under about 620 tokens and 1 in 10 is over 2200: the long
tail of chat traffic. `save_requests` writes the requests as a JSONL dataset (token ids,
max_tokens, ignore_eos), which `--dataset` reads back and `scripts/bench_hf_peer.py
--requests` runs through transformers, so a peer gets exactly the same work.

The report gives TTFT, TPOT, inter-token latency and end-to-end latency percentiles,
throughput and errors by gRPC code. Inter-token latency is the gap between streamed chunks;
a chunk holds several tokens with multi-step decode or accepted speculative tokens. TPOT
is per token after the first chunk: the time from the first chunk to the last over the
tokens that came after the first chunk (a request whose tokens all came in one chunk has
none, rather than a TPOT of 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from jaxserve.config import make_dir
from jaxserve.engine.request import SamplingParams
from jaxserve.errors import JaxserveError
from jaxserve.jsonl import read_jsonl
from jaxserve.server.client import AsyncClient
from jaxserve.server.proto import jaxserve_pb2 as pb
from jaxserve.server.protocol import host_port, make_request

PERCENTILES = (50, 90, 99)
LENGTHS = ("fixed", "lognormal")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    rate: float | None = None  # requests/s, Poisson arrivals
    concurrency: int | None = None  # requests in flight at most
    num_requests: int = 100
    input_len: int = 128
    output_len: int = 128
    lengths: str = "fixed"  # random prompts: fixed | lognormal (input_len, output_len: means)
    length_sigma: float = 1.0  # lognormal: sigma of ln(length)
    dataset: str | None = None  # JSONL: {"prompt"|"token_ids"|"messages", "max_tokens"?,
    #                                     "ignore_eos"?}
    save_requests: str | None = None  # write the random requests here as a JSONL dataset
    seed: int = 0
    prompt_round: int = 0  # random prompts: the token ids' draw (a sweep's run index)
    timeout_s: float | None = None  # per-request deadline
    progress: bool = True

    def __post_init__(self):
        if self.rate is None and self.concurrency is None:
            raise JaxserveError("bench serve: give --rate or --concurrency (or both)")
        if self.rate is not None and not self.rate > 0:
            raise JaxserveError(f"--rate: must be > 0 (got {self.rate})")
        if self.concurrency is not None and self.concurrency < 1:
            raise JaxserveError(f"--concurrency: must be >= 1 (got {self.concurrency})")
        for name in ("num_requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise JaxserveError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.lengths not in LENGTHS:
            raise JaxserveError(f"--lengths: one of {', '.join(LENGTHS)} (got {self.lengths})")
        if not self.length_sigma > 0:
            raise JaxserveError(f"--length-sigma: must be > 0 (got {self.length_sigma})")
        if self.save_requests and self.dataset:
            raise JaxserveError("--save-requests: writes random requests; it cannot be "
                                "combined with --dataset")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise JaxserveError(f"--timeout: must be > 0 seconds (got {self.timeout_s})")


@dataclasses.dataclass
class Result:
    code: str  # gRPC status code name; "OK" on success
    start: float
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # chunks with tokens
    end: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache
    output_tokens: int = 0
    first_chunk_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first chunk: None when every token came in the
        first chunk (nothing after it was timed; 0 would pull the percentiles down)."""
        after_first = self.output_tokens - self.first_chunk_tokens
        if not self.chunk_times or after_first < 1:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / after_first


# ----- requests --------------------------------------------------------------------------
def request_lengths(cfg: BenchConfig, context_length: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of each random request (see the module docstring)."""
    n = cfg.num_requests
    if cfg.lengths == "fixed":
        return [(cfg.input_len, cfg.output_len)] * n
    rng = np.random.default_rng(cfg.seed + 2)
    sigma = cfg.length_sigma

    def draw(mean: int) -> np.ndarray:
        return np.maximum(1, np.rint(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)))

    prompts = np.minimum(draw(cfg.input_len), context_length - 1).astype(int)
    outputs = np.minimum(draw(cfg.output_len), context_length - prompts).astype(int)
    return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def synthetic_rows(cfg: BenchConfig, vocab_size: int, context_length: int) -> list[dict]:
    """The random requests as dataset rows: token ids, max_tokens, ignore_eos. The
    lengths come from `seed` alone; the token ids from `seed` and `prompt_round`."""
    rng = np.random.default_rng(cfg.seed if cfg.prompt_round == 0
                                else (cfg.seed, cfg.prompt_round))
    return [{"token_ids": rng.integers(0, vocab_size, n_in).tolist(), "max_tokens": n_out,
             "ignore_eos": True} for n_in, n_out in request_lengths(cfg, context_length)]


def synthetic_requests(cfg: BenchConfig, vocab_size: int,
                       context_length: int) -> list[pb.GenerateRequest]:
    rows = synthetic_rows(cfg, vocab_size, context_length)
    if cfg.save_requests:
        # checked writable by run(), before any request
        _write_text(Path(cfg.save_requests), "".join(json.dumps(row) + "\n" for row in rows),
                    "--save-requests")
    return [make_request(row["token_ids"], params=SamplingParams(
        max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True)) for row in rows]


def dataset_requests(cfg: BenchConfig) -> list[pb.GenerateRequest]:
    """Rows of the dataset, cycled to num_requests; max_tokens defaults to output_len."""
    path = Path(cfg.dataset)
    rows = []
    for n, row in read_jsonl(path, "--dataset file"):
        try:
            prompt, max_tokens, ignore_eos = _dataset_row(row, cfg.output_len)
        except ValueError as e:
            raise JaxserveError(f"{path}:{n}: {e}") from None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        rows.append(make_request(prompt, params=params))
    if not rows:
        raise JaxserveError(f"{path}: no requests")
    return [rows[i % len(rows)] for i in range(cfg.num_requests)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dataset_row(row: dict, output_len: int) -> tuple[str | list, int, bool]:
    """(prompt, max_tokens, ignore_eos) of one dataset row; ValueError names what is wrong."""
    kinds = [k for k in ("prompt", "token_ids", "messages") if k in row]
    if len(kinds) != 1:
        raise ValueError('expected one of "prompt", "token_ids" or "messages"')
    prompt = row[kinds[0]]
    if kinds[0] == "prompt" and not (isinstance(prompt, str) and prompt):
        raise ValueError('"prompt" must be a non-empty string')
    if kinds[0] == "token_ids" and not (isinstance(prompt, list) and prompt
                                        and all(map(_is_int, prompt))):
        raise ValueError('"token_ids" must be a non-empty list of integers')
    if kinds[0] == "messages" and not (
            isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in prompt)):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} strings')
    max_tokens = row.get("max_tokens", output_len)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f'"max_tokens" must be an integer >= 1 (got {max_tokens!r})')
    ignore_eos = row.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ValueError(f'"ignore_eos" must be true or false (got {ignore_eos!r})')
    return prompt, max_tokens, ignore_eos


# ----- running ---------------------------------------------------------------------------
async def _one(client: AsyncClient, request: pb.GenerateRequest, timeout) -> Result:
    result = Result("OK", time.perf_counter())
    call = client.generate(request, timeout=timeout)
    try:
        async for chunk in call:
            if chunk.token_ids:
                result.chunk_times.append(time.perf_counter())
                result.output_tokens += len(chunk.token_ids)
                if len(result.chunk_times) == 1:
                    result.first_chunk_tokens = len(chunk.token_ids)
            if chunk.HasField("usage"):
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.cached_tokens = chunk.usage.cached_tokens
    except grpc.aio.AioRpcError as e:
        result.code = e.code().name
    result.end = time.perf_counter()
    return result


def arrival_times(cfg: BenchConfig) -> list[float]:
    """Send times in seconds from the start: Poisson with cfg.rate, else all at 0."""
    if cfg.rate is None:
        return [0.0] * cfg.num_requests
    gaps = np.random.default_rng(cfg.seed + 1).exponential(1.0 / cfg.rate, cfg.num_requests)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


async def run_load(cfg: BenchConfig) -> tuple[list[Result], float, pb.ModelInfo]:
    async with AsyncClient(cfg.host, cfg.port, token=cfg.token, tls_ca=cfg.tls_ca,
                           tls_server_name=cfg.tls_server_name) as client:
        try:
            info = await client.model_info(timeout=30)
        except grpc.aio.AioRpcError as e:
            raise JaxserveError(f"{host_port(cfg.host, cfg.port)}: {e.code().name}: "
                                f"{e.details()}") from None
        requests = (dataset_requests(cfg) if cfg.dataset
                    else synthetic_requests(cfg, info.vocab_size, info.context_length))
        limit = asyncio.Semaphore(cfg.concurrency or len(requests))
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not cfg.progress)
        start = time.perf_counter()

        async def send(request, at):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with limit:
                result = await _one(client, request, cfg.timeout_s)
            bar.update()
            return result

        results = await asyncio.gather(*(send(r, t) for r, t in
                                         zip(requests, arrival_times(cfg), strict=True)))
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration, info


# ----- the report ------------------------------------------------------------------------
def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values)
    return {"mean": float(arr.mean()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def make_report(cfg: BenchConfig, results: list[Result], duration: float,
                info: pb.ModelInfo) -> dict:
    ok = [r for r in results if r.code == "OK"]
    errors: dict[str, int] = {}
    for r in results:
        if r.code != "OK":
            errors[r.code] = errors.get(r.code, 0) + 1
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    config = dataclasses.asdict(cfg)
    config.pop("token")
    return {
        "benchmark": "serve",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": host_port(cfg.host, cfg.port),
        "model": {"name": info.model_name, "dtype": info.dtype, "mesh": dict(info.mesh),
                  "context_length": info.context_length},
        "config": config,
        "duration_s": duration,
        "num_requests": len(results),
        "completed": len(ok),
        "errors": errors,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "input_token_throughput": in_tokens / duration if duration else 0.0,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "total_cached_input_tokens": sum(r.cached_tokens for r in ok),
        "ttft_s": _summary([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _summary([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _summary(itl),
        "e2e_latency_s": _summary([r.end - r.start for r in ok]),
    }


def format_report(report: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.1f}"

    lines = [f"{'latency (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                       ("e2e_latency_s", "end to end")):
        s = report[key]
        lines.append(f"{label:<16}" + "".join(f"{ms(s[k]):>10}"
                                              for k in ("mean", "p50", "p90", "p99")))
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(report["errors"].items())) or "none"
    lines += [
        "",
        f"requests      {report['completed']}/{report['num_requests']} completed "
        f"in {report['duration_s']:.2f} s; errors: {errors}",
        f"throughput    {report['request_throughput']:.2f} req/s, "
        f"{report['output_token_throughput']:.1f} output tok/s, "
        f"{report['input_token_throughput']:.1f} input tok/s "
        f"({report['total_cached_input_tokens']} of {report['total_input_tokens']} prompt "
        "tokens from the prefix cache)",
    ]
    return "\n".join(lines)


def default_out() -> Path:
    """<cache dir>/bench/serve-<time>.json: outside the source tree unless --out says so."""
    from jaxserve.config import default_cache_dir

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(default_cache_dir()).expanduser() / "bench" / f"serve-{stamp}.json"


def measure(cfg: BenchConfig) -> dict:
    """Run the load and print its table; returns the report."""
    results, duration, info = asyncio.run(run_load(cfg))
    report = make_report(cfg, results, duration, info)
    print(format_report(report))
    return report


def format_sweep(reports: list[dict]) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.0f}"
    lines = [f"{'rate (req/s)':>12}{'achieved':>10}{'out tok/s':>11}{'TTFT p50':>10}"
             f"{'p99':>8}{'TPOT p50':>10}{'p99':>8}{'cached':>8}{'errors':>8}"]
    for r in reports:
        cached = r["total_cached_input_tokens"] / max(r["total_input_tokens"], 1)
        lines.append(f"{r['config']['rate']:>12g}{r['request_throughput']:>10.2f}"
                     f"{r['output_token_throughput']:>11.1f}{ms(r['ttft_s']['p50']):>10}"
                     f"{ms(r['ttft_s']['p99']):>8}{ms(r['tpot_s']['p50']):>10}"
                     f"{ms(r['tpot_s']['p99']):>8}{cached:>8.0%}"
                     f"{sum(r['errors'].values()):>8}")
    return "\n".join(lines)


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any request is sent, a file the results could not be written to (a
    run's figures would be lost at its end)."""
    if path.is_dir():
        raise JaxserveError(f"{flag}: {path} is a directory")
    make_dir(path.parent, flag)
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise JaxserveError(f"{flag}: cannot write {path}")


def _write_text(path: Path, text: str, flag: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise JaxserveError(f"{flag}: cannot write {path}: {e.strerror}") from None


def _write(report: dict, path: Path) -> None:
    _write_text(path, json.dumps(report, indent=2) + "\n", "--out")
    print(f"wrote {path}")


def run(cfg: BenchConfig, out: str | Path | None = None,
        rates: list[float] | None = None) -> dict:
    """Run the load (once, or once per rate of a sweep), print the tables and write the JSON
    report; returns it. A sweep's report holds one run's report per rate."""
    # Checked before any run; requests of the same lengths at every rate, random prompts
    # drawn anew for each (see the module docstring), saved by the first run only.
    configs = [dataclasses.replace(cfg, rate=rate, prompt_round=i,
                                   save_requests=None if i else cfg.save_requests)
               for i, rate in enumerate(rates or [cfg.rate])]
    path = Path(out) if out else default_out()
    check_writable(path, "--out")
    if cfg.save_requests:
        check_writable(Path(cfg.save_requests), "--save-requests")
    if len(configs) == 1:
        report = measure(configs[0])
    else:
        runs = []
        for each in configs:
            print(f"--- rate {each.rate:g} req/s")
            runs.append(measure(each))
        print(format_sweep(runs))
        report = {"benchmark": "serve-sweep", "date": runs[0]["date"],
                  "rates": list(rates), "runs": runs}
    _write(report, path)
    return report
