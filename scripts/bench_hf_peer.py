"""The peer in the same run: Hugging Face transformers `generate` with a static KV cache
(which transformers compiles with torch.compile itself), random weights of the same
shapes, greedy, fixed prompt/output lengths.

    python scripts/bench_hf_peer.py --shape configs/shapes/llama3-8b.json \
        --batch 1 32 128 --input-len 512 --output-len 64

A model larger than one GPU (Mixtral-8x7B) is spread over every GPU the way
`from_pretrained(..., device_map="auto")` does it (accelerate: balanced memory, whole decoder
layers per GPU, hooks that move activations between them), with --device-map auto and
--no-compile (a dynamic cache: torch.compile does not span the hooks):

    python scripts/bench_hf_peer.py --shape configs/shapes/mixtral-8x7b.json \
        --device-map auto --no-compile --batch 1 32 128

Transformers' own tensor parallelism (the `base_model_tp_plan` of the model, one process
per GPU under torchrun) is --tp. It loads a checkpoint, so rank 0 first saves random
weights of the shape to --checkpoint-dir (skipped when one is there); only rank 0 writes:

    torchrun --nproc-per-node 2 scripts/bench_hf_peer.py --shape configs/shapes/llama3-8b.json \
        --tp --checkpoint-dir hf-llama3-8b-random --no-compile --batch 1 32

The naive baseline of a serving benchmark: the requests `jaxserve bench serve
--save-requests` wrote (token ids and max_tokens each), in order, in static batches of
--batch requests. Each batch is left-padded to its longest prompt and generates its largest
max_tokens for every row; output tok/s counts each request's own max_tokens over the wall
time of all the batches, after a warm-up on the first batch (whole when compiled, whose
shapes must match; 4 tokens when eager). --max-requests keeps the file's first N:

    python scripts/bench_hf_peer.py --shape configs/shapes/llama3-8b.json \
        --requests requests.jsonl --batch 32 128

Runs on the GPU machine's own Python (torch + transformers there); without a GPU it runs on
the CPU in float32 (small shapes, for checking the script). Writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)


def hf_config(shape: dict):
    common = dict(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["rms_norm_eps"],
        max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=shape["tie_word_embeddings"])
    if shape["architecture"] == "mixtral":
        return MixtralForCausalLM, MixtralConfig(
            **common, num_local_experts=shape["num_experts"],
            num_experts_per_tok=shape["num_experts_per_tok"])
    return LlamaForCausalLM, LlamaConfig(**common)


GPU = torch.cuda.is_available()


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def build(shape: dict, device_map: str | None = None):
    cls, cfg = hf_config(shape)
    torch.manual_seed(0)
    if device_map == "auto":
        return build_spread(cls, cfg)
    with torch.device("cuda" if GPU else "cpu"):
        model = cls(cfg).to(torch.bfloat16 if GPU else torch.float32)
    return model.eval()


def build_spread(cls, cfg):
    """What from_pretrained(device_map="auto") builds, with random weights made in place."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device

    with init_empty_weights():
        model = cls(cfg).to(torch.bfloat16)  # the meta parameters' dtype is what is built
    keep = model._no_split_modules or []
    budget = get_balanced_memory(model, dtype=torch.bfloat16, no_split_module_classes=keep)
    device_map = infer_auto_device_map(model, max_memory=budget, dtype=torch.bfloat16,
                                       no_split_module_classes=keep)
    for name, param in model.named_parameters():
        owner = max((k for k in device_map if k == "" or name.startswith(k + ".")), key=len)
        device = device_map[owner]
        value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
        value.normal_(0.0, 0.02) if param.dim() > 1 else value.fill_(1.0)
        set_module_tensor_to_device(model, name, device, value=value, dtype=torch.bfloat16)
    model = dispatch_model(model, device_map=device_map)
    if getattr(cfg, "num_local_experts", 0):
        # grouped matmuls over the experts (torch grouped_mm): the fastest transformers offers,
        # and unlike "batched_mm" it does not copy each token's expert weights
        try:
            model.set_experts_implementation("grouped_mm")
        except (ValueError, ImportError):
            model.set_experts_implementation("eager")
    gib = [round(torch.cuda.memory_allocated(i) / 2**30, 1)
           for i in range(torch.cuda.device_count())]
    print(f"GiB per GPU: {gib}, experts: {getattr(cfg, '_experts_implementation', None)}",
          flush=True)
    return model.eval()


def build_tp(shape: dict, checkpoint_dir: str):
    """The model split over every torchrun process by transformers' tensor-parallel plan."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    path = Path(checkpoint_dir)
    if dist.get_rank() == 0 and not (path / "config.json").exists():
        cls, cfg = hf_config(shape)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = cls(cfg).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    dist.barrier()
    try:  # transformers >= 5.17 takes the plan's size in a DistributedConfig
        from transformers import DistributedConfig
        options = {"distributed_config": DistributedConfig(tp_size=dist.get_world_size())}
    except ImportError:
        options = {"tp_plan": "auto"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **options)
    print(f"rank {dist.get_rank()}: GiB on this GPU "
          f"{torch.cuda.memory_allocated() / 2**30:.1f}", flush=True)
    return model.eval()


def run(model, batch: int, input_len: int, output_len: int, compiled: bool,
        reps: int = 3) -> dict:
    """Median time of `generate` for output_len tokens, and of a generate that stops after
    the first token; their difference is the decode of output_len - 1 tokens."""
    torch.manual_seed(batch)  # the same prompts in every process under torchrun
    ids = torch.randint(3, model.config.vocab_size, (batch, input_len), device=model.device)

    def timed(new_tokens: int) -> float:
        gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False,
                               cache_implementation="static" if compiled else None,
                               pad_token_id=0, eos_token_id=None)
        for _ in range(1 if reps == 1 else 2):  # warm-up (compiles)
            model.generate(ids, generation_config=gen)
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model.generate(ids, generation_config=gen)
            sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    t = timed(output_len)
    first = timed(1)
    return {"batch": batch, "input_len": input_len, "output_len": output_len,
            "compiled_static_cache": compiled, "seconds": t, "output_tok_s": batch * output_len / t,
            "first_token_seconds": first,
            "decode_step_ms": (t - first) / (output_len - 1) * 1e3,
            "decode_tok_s": batch * (output_len - 1) / (t - first)}


def run_requests(model, rows: list[dict], batch: int, compiled: bool) -> dict:
    """The requests in order, `batch` at a time (see the module docstring)."""
    chunks = [rows[i:i + batch] for i in range(0, len(rows), batch)]

    def generate(chunk: list[dict], new: int | None = None) -> None:
        longest = max(len(r["token_ids"]) for r in chunk)
        ids = torch.zeros((len(chunk), longest), dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for i, r in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[i, longest - len(r["token_ids"]):] = torch.tensor(r["token_ids"])
            mask[i, longest - len(r["token_ids"]):] = 1
        new = new or max(r["max_tokens"] for r in chunk)
        gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               cache_implementation="static" if compiled else None,
                               pad_token_id=0, eos_token_id=None)
        model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                       generation_config=gen)

    # Warm-up: a compiled static cache compiles for the chunk's exact shapes, so it runs the
    # first chunk whole; eager runs need only their kernels loaded (a few tokens).
    generate(chunks[0], None if compiled else 4)
    sync()
    t = time.perf_counter()
    for chunk in chunks:
        generate(chunk)
    sync()
    seconds = time.perf_counter() - t
    useful = sum(r["max_tokens"] for r in rows)
    return {"batch": batch, "requests": len(rows), "compiled_static_cache": compiled,
            "seconds": seconds, "output_tokens": useful,
            "input_tokens": sum(len(r["token_ids"]) for r in rows),
            "generated_tokens": sum(len(c) * max(r["max_tokens"] for r in c) for c in chunks),
            "output_tok_s": useful / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device-map", choices=["auto"], help="spread over every GPU")
    ap.add_argument("--tp", action="store_true",
                    help="transformers' tensor parallelism, one process per GPU (torchrun)")
    ap.add_argument("--checkpoint-dir", help="with --tp: where the random weights are saved")
    ap.add_argument("--reps", type=int, default=3, help="timed generates per figure (median)")
    ap.add_argument("--requests", metavar="JSONL",
                    help="run these requests (jaxserve bench serve --save-requests) in static "
                         "batches of --batch instead of fixed lengths")
    ap.add_argument("--max-requests", type=int, help="with --requests: only the first N")
    ap.add_argument("--out", default="bench/results/hf-peer.json")
    args = ap.parse_args()
    shape = json.loads(Path(args.shape).read_text())
    if args.tp:
        if not args.checkpoint_dir or "LOCAL_RANK" not in os.environ:
            ap.error("--tp runs under torchrun and needs --checkpoint-dir")
        model = build_tp(shape, args.checkpoint_dir)
    else:
        model = build(shape, args.device_map)  # a static cache: generate() compiles the step
    writes = int(os.environ.get("RANK", "0")) == 0
    rows = []
    requests = ([json.loads(line) for line in Path(args.requests).read_text().splitlines()
                 if line.strip()][:args.max_requests] if args.requests else None)
    for b in args.batch:  # every row is on disk as soon as it is measured
        if requests:
            rows.append(run_requests(model, requests, b, not args.no_compile))
        else:
            rows.append(run(model, b, args.input_len, args.output_len, not args.no_compile,
                            args.reps))
        if not writes:
            continue
        print(json.dumps(rows[-1]), flush=True)
        result = {"benchmark": "hf-peer", "date": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"), "device": torch.cuda.get_device_name() if GPU else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "gpus": torch.cuda.device_count(), "device_map": args.device_map,
            "requests": args.requests, "max_requests": args.max_requests,
            "tensor_parallel": int(os.environ.get("WORLD_SIZE", "1")) if args.tp else None,
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "shape": args.shape, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
