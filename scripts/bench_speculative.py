"""Speculative decoding (n-gram) against plain decoding: output tok/s, acceptance and
mean accepted length, on a repetitive and a non-repetitive workload, same run.

    python scripts/bench_speculative.py --config configs/smollm2-135m-cpu.yaml \
        --batch 1 8 --num-tokens 4 --rounds 3

Repetitive: chat requests to repeat a passage of the committed public-domain text
(bench/texts/, 150 words each) word for word. Non-repetitive: chat requests to write
something new. Both greedy, with --output-len tokens at most. Each round runs every
(workload, batch) without and with speculation, alternating, on one loaded model; the
figures are medians over rounds. Checks that both give the same tokens. Writes JSON
(default bench/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import jax

from jaxserve.config import SpeculativeSection, load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model

TEXT = Path(__file__).resolve().parent.parent / "bench" / "texts" / "public-domain-sample.txt"
TOPICS = ("a lighthouse keeper", "a city under the sea", "the first snow of winter",
          "a clockmaker's apprentice", "a journey across a desert", "a lost letter",
          "an old bridge", "a garden at night")


def workloads(tokenizer, batch: int, words_per_passage: int = 150) -> dict[str, list[list[int]]]:
    words = TEXT.read_text().split()
    repeat, new = [], []
    for i in range(batch):
        w = words_per_passage
        passage = " ".join(words[i * w:(i + 1) * w])
        repeat.append(tokenizer.encode_chat([{"role": "user", "content":
                      f"Repeat the following text exactly, word for word:\n\n{passage}"}]))
        new.append(tokenizer.encode_chat([{"role": "user", "content":
                   f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]))
    return {"repetitive": repeat, "non-repetitive": new}


def run(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0)
    before = engine.stats()
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    seconds = time.perf_counter() - t0
    after = engine.stats()
    draft = after.draft_tokens - before.draft_tokens
    accepted = after.accepted_tokens - before.accepted_tokens
    steps = after.verify_steps - before.verify_steps
    n = sum(len(t) for t in tokens.values())
    return {"output_tokens": n, "seconds": seconds, "output_tok_s": n / seconds,
            "draft_tokens": draft, "accepted_tokens": accepted, "verify_steps": steps,
            "acceptance": accepted / draft if draft else None,
            "mean_accepted_length": (accepted + steps) / steps if steps else None,
            "tokens": [tokens[i] for i in ids]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--output-len", type=int, default=64,
                    help="at most; shorter than the passage, so a copy never runs out")
    ap.add_argument("--num-tokens", type=int, default=4, help="k, tokens proposed per step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()

    base = load_config(args.config)
    loaded = load_model(base)
    spec = SpeculativeSection(method="ngram", num_tokens=args.num_tokens)
    engines = {}
    for name, config in (("plain", base), ("ngram", base.replace(speculative=spec))):
        engines[name] = Engine(config, loaded.model_config, loaded.params, loaded.tokenizer,
                               loaded.mesh)
        engines[name].warm_up()
        run(engines[name], workloads(loaded.tokenizer, 1)["repetitive"], 8)  # first runs
    rows: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for r in range(args.rounds):
        for batch in args.batch:
            for kind, prompts in workloads(loaded.tokenizer, batch).items():
                for name in ("plain", "ngram"):
                    res = run(engines[name], prompts, args.output_len)
                    rows.setdefault((kind, batch), {}).setdefault(name, []).append(res)
                    print(f"round {r + 1} {kind:15s} B={batch:<3d} {name:6s} "
                          f"{res['output_tok_s']:8.1f} tok/s  acceptance {res['acceptance']}"
                          f"  mean length {res['mean_accepted_length']}", flush=True)

    results = []
    for (kind, batch), by in rows.items():
        same = all(a["tokens"] == b["tokens"] for a, b in zip(by["plain"], by["ngram"],
                                                               strict=True))
        med = {name: statistics.median(x["output_tok_s"] for x in by[name]) for name in by}
        last = by["ngram"][-1]
        results.append({
            "workload": kind, "batch": batch, "same_tokens": same,
            "plain_tok_s": med["plain"], "ngram_tok_s": med["ngram"],
            "speedup": med["ngram"] / med["plain"],
            "plain_tok_s_rounds": [x["output_tok_s"] for x in by["plain"]],
            "ngram_tok_s_rounds": [x["output_tok_s"] for x in by["ngram"]],
            **{k: last[k] for k in ("acceptance", "mean_accepted_length", "draft_tokens",
                                    "accepted_tokens", "verify_steps", "output_tokens")}})
        print(f"{kind:15s} B={batch:<3d} plain {med['plain']:8.1f}  ngram {med['ngram']:8.1f}"
              f"  {med['ngram'] / med['plain']:.2f}x  same tokens: {same}")
    report = {
        "benchmark": "speculative-ngram", "date": datetime.datetime.now(
            datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "machine": platform.machine(),
        "config": args.config, "num_tokens": args.num_tokens, "output_len": args.output_len,
        "rounds": args.rounds, "speculative": dataclasses.asdict(spec), "results": results}
    out = Path(args.out or f"bench/results/speculative-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
