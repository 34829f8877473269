"""What verifying k proposed tokens costs: a step in which every sequence carries k proposed
tokens after its last one, against a plain decode step, same model, same run.

    python scripts/bench_verify_cost.py --config configs/llama3-8b-random-gpu.yaml \
        --batch 1 32 --num-tokens 2 4 8 --context 512

For each k (0 is plain decoding) and batch B, a fresh engine serves B requests of --context
random prompt tokens with `speculative.num_tokens: k`. Its proposer is replaced by one that
proposes k copies of one token every step and never switches off (`min_accepted: 0`), so
every decode step verifies k tokens per sequence, whatever the weights. With random weights
nearly all of them are rejected, so each step still gives about one token per sequence:
the figure is the cost of a verifying step, the ceiling a real model's acceptance must pay
for. Two times per step:
- engine: `Engine.step()` wall time over --steps steps, host included. A speculating
  engine reads each step back before proposing, so it loses the overlap of host and device
  that plain decoding has;
- device: the compiled step replayed back to back on one step's inputs, with no host work
  but the dispatch (hidden while it is shorter than the device step).
Writes JSON (default bench/results/).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import jax
import numpy as np
from engine_runs import abort_all, bucket_overrides, decode_together, replay_ms

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model


def measure(config, loaded, k: int, batch: int, context: int, steps: int) -> dict:
    spec = {"speculative__method": "ngram", "speculative__num_tokens": k,
            "speculative__min_accepted": 0.0} if k else {"speculative__method": "none"}
    engine = Engine(config.replace(**spec), loaded.model_config, loaded.params,
                    loaded.tokenizer, loaded.mesh)
    vocab = loaded.model_config.vocab_size
    if k:  # always k proposals, of a token a random model hardly ever picks twice in a row
        engine.proposer.lookup = lambda ids, n: [int(ids[-1]) ^ 1] * n
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, context).tolist() for _ in range(batch)]
    # prefill, then 3 steps that compile the decode (or verify) program
    decode_together(engine, prompts, SamplingParams(max_tokens=steps * 4 + 64,
                                                    temperature=0.0, ignore_eos=True), "r")
    before, t = engine.stats(), time.perf_counter()
    for _ in range(steps):
        engine.step()
    engine_ms = (time.perf_counter() - t) / steps * 1000
    after = engine.stats()

    # The compiled step replayed alone, on the inputs of one more step.
    if engine.proposer is not None:
        engine._propose(engine.step_times)
    out = engine.scheduler.schedule()
    runner = engine.runner
    handle = runner.execute(out, engine.page_tables, engine.in_flight)
    handle.fetch()
    bucket, host_in = runner.prepare(out, engine.page_tables, handle)
    device_ms = replay_ms(runner, bucket, host_in, handle.prev_tokens, steps)
    abort_all(engine)
    proposed = after.draft_tokens - before.draft_tokens
    accepted = after.accepted_tokens - before.accepted_tokens
    row = {"k": k, "batch": batch, "bucket": list(bucket), "context": context,
           "engine_step_ms": engine_ms, "device_step_ms": device_ms,
           "proposed_tokens": proposed, "accepted_tokens": accepted,
           "verify_steps": after.verify_steps - before.verify_steps, "steps": steps}
    del engine, runner, handle
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--num-tokens", type=int, nargs="+", default=[2, 4, 8],
                    help="k values; plain decoding (k=0) is always measured first")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case")
    ap.add_argument("--kv-cache-memory", type=float, default=8.0, help="GiB of KV pages")
    ap.add_argument("--token-buckets", type=int, nargs="+", default=None)
    ap.add_argument("--seq-buckets", type=int, nargs="+", default=None)
    ap.add_argument("--compilation-cache-dir", default=None)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()
    over = {"cache__kv_cache_memory": args.kv_cache_memory * 2**30,
            "runner__compilation_cache_dir": args.compilation_cache_dir,
            "scheduler__max_num_seqs": max(args.batch),
            **bucket_overrides(args.token_buckets, args.seq_buckets)}
    config = load_config(args.config).replace(**over)
    loaded = load_model(config)
    rows = []
    for batch in args.batch:
        for k in [0] + [k for k in args.num_tokens if k]:
            rows.append(measure(config, loaded, k, batch, args.context, args.steps))
            base = next(r for r in rows if r["batch"] == batch and r["k"] == 0)
            for key in ("engine_step_ms", "device_step_ms"):
                rows[-1][key.replace("_ms", "_vs_plain")] = rows[-1][key] / base[key]
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
              "date": datetime.date.today().isoformat(), "config": args.config,
              "model": config.model.name, "runner": {
                  "token_buckets": list(config.runner.token_buckets),
                  "seq_buckets": list(config.runner.seq_buckets),
                  "scan_unroll": config.runner.scan_unroll}, "rows": rows}
    out = Path(args.out or f"bench/results/verify-cost-{config.model.name}-"
               f"{jax.devices()[0].platform}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
