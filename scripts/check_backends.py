"""Greedy tokens with attention_backend=pallas and pallas_flash vs reference, on the GPU.

    python scripts/check_backends.py --config configs/smollm2-135m-gpu.yaml \
        --config configs/llama3-8b-random-gpu.yaml --out bench/results/backends.json

Mixed batches (prefill chunks beside decodes). Where the two differ, the report gives the
first differing step and the reference's top-2 logprob gap there (a near-tie in bf16 is
expected to flip; a large gap is a bug).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model


def generate(engine: Engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(p, params, f"p{i}")
    tokens = {f"p{i}": [] for i in range(len(prompts))}
    lps = {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            lps[out.request_id] += [lp.top for lp in out.logprobs]
    return [tokens[f"p{i}"] for i in range(len(prompts))], [lps[f"p{i}"] for i in
                                                           range(len(prompts))]


def check(config_path: str, num_prompts: int, max_tokens: int, backends) -> dict:
    base = load_config(config_path).replace(cache__kv_cache_memory=float(2**31),
                                            runner__compilation_cache_dir=None)
    loaded = load_model(base)
    rng = np.random.default_rng(0)
    vocab = loaded.model_config.vocab_size
    prompts = [rng.integers(3, min(vocab, 32000), int(n)).tolist()
               for n in rng.integers(5, 700, num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=2)
    runs = {}
    for backend in ("reference", *backends):
        cfg = base.replace(runner__attention_backend=backend)
        engine = Engine(cfg, loaded.model_config, loaded.params, loaded.tokenizer, loaded.mesh)
        runs[backend] = generate(engine, prompts, params)
        del engine
    result = {"config": config_path, "model": base.model.name, "prompts": num_prompts,
              "max_tokens": max_tokens}
    for backend in backends:
        rows = []
        for i in range(num_prompts):
            ref, pal = runs["reference"][0][i], runs[backend][0][i]
            diff = next((j for j, (a, b) in enumerate(zip(ref, pal, strict=True)) if a != b),
                        None)
            gap = None
            if diff is not None:
                top = runs["reference"][1][i][diff]
                gap = top[0][1] - top[1][1]
            rows.append({"prompt_len": len(prompts[i]), "equal": diff is None,
                         "first_diff": diff, "ref_top2_gap_at_diff": gap})
        equal = sum(r["equal"] for r in rows)
        print(f"{config_path} {backend}: {equal}/{num_prompts} prompts identical to the "
              f"reference over {max_tokens} tokens")
        for r in rows:
            if not r["equal"]:
                print("  differs:", r)
        result[backend] = {"identical": equal, "rows": rows}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=["pallas", "pallas_flash"])
    ap.add_argument("--out", default="bench/results/backends.json")
    args = ap.parse_args()
    results = [check(c, args.num_prompts, args.max_tokens, args.backends) for c in args.config]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
