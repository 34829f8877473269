"""The CPU peer: Hugging Face transformers (PyTorch) on the same GGUF and the same request
shapes as `scripts/bench_offline.py`, and optionally llama.cpp's own benchmark.

Runs in its own Python 3.11 environment (REF: a directory of your choice), so torch is
never a jaxserve dependency:
    python3.11 -m venv REF && REF/bin/pip install torch==2.13.0 transformers \
        accelerate gguf sentencepiece numpy
    REF/bin/python scripts/bench_cpu_peer.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 1 16 --input-len 128 --output-len 64 --threads 2 --out peer.json
B requests of --input-len random prompt tokens each generate exactly --output-len tokens
(greedy), in one `generate` call of batch B; output tok/s is B x output-len over its wall
time, prefill included, as bench_offline counts it. `--llama-bench PATH` also runs
llama.cpp's `llama-bench -p INPUT -n OUTPUT -t THREADS` on the same GGUF and keeps its JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def time_generate(model, batch: int, input_len: int, output_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(3, model.config.vocab_size, (batch, input_len)))
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    times = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, **kwargs)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"batch": batch, "input_len": input_len, "output_len": output_len,
            "seconds": best, "output_tok_s": batch * output_len / best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name,
                                                 dtype=torch.float32).eval()
    rows = []
    for b in args.batch:
        rows.append(time_generate(model, b, args.input_len, args.output_len, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "cpu-peer", "peer": "transformers",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "host": platform.node(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__,
              "threads": args.threads, "gguf": args.gguf.name, "rows": rows}
    if args.llama_bench:
        out = subprocess.run([args.llama_bench, "-m", str(args.gguf), "-p", str(args.input_len),
                              "-n", str(args.output_len), "-t", str(args.threads), "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        result["llama_bench"] = json.loads(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
