"""The peer in the same run: Hugging Face transformers `generate` with a static KV cache
(which transformers compiles with torch.compile itself), random weights of the same
shapes, greedy, fixed prompt/output lengths.

    python scripts/bench_hf_peer.py --shape configs/shapes/llama3-8b.json \
        --batch 1 32 128 --input-len 512 --output-len 64

Runs on the GPU machine's own Python (torch + transformers there); writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM


def build(shape: dict) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["rms_norm_eps"],
        max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=shape["tie_word_embeddings"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def run(model, batch: int, input_len: int, output_len: int, compiled: bool) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, input_len), device="cuda")
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len,
                           do_sample=False, cache_implementation="static" if compiled else None,
                           pad_token_id=0, eos_token_id=None)
    kwargs = {"generation_config": gen}
    for _ in range(2):  # warm-up (compiles)
        model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    t = sorted(times)[1]
    return {"batch": batch, "input_len": input_len, "output_len": output_len,
            "compiled_static_cache": compiled, "seconds": t,
            "output_tok_s": batch * output_len / t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="bench/results/hf-peer.json")
    args = ap.parse_args()
    shape = json.loads(Path(args.shape).read_text())
    model = build(shape)  # with a static cache, generate() compiles the decode step itself
    rows = []
    for b in args.batch:
        rows.append(run(model, b, args.input_len, args.output_len, not args.no_compile))
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "hf-peer", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "shape": args.shape, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
