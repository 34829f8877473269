"""Write golden fixtures for the demo model from an independent reference: Hugging Face
transformers (PyTorch) loading the same GGUF.

Runs in its own Python 3.11 environment (REF: a directory of your choice) with torch,
transformers, accelerate, gguf:
    python3.11 -m venv REF && REF/bin/pip install torch==2.13.0 transformers \
        accelerate gguf sentencepiece numpy
    REF/bin/python scripts/make_golden_fixtures.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
Writes tests/fixtures/smollm2_golden.json (prompt ids, greedy ids, top logits of the first
steps) and tests/fixtures/smollm2_first_logits.npy (full first-step logits, float32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    {"kind": "raw", "text": "The capital of France is"},
    {"kind": "raw", "text": "def fibonacci(n):\n    "},
    {"kind": "raw", "text": "Once upon a time, in a small village,"},
    {"kind": "raw", "text": "Les mathématiques sont 🧮 très"},
    {"kind": "chat", "text": "What is the largest planet in the solar system?"},
    {"kind": "chat", "text": "Write a haiku about the sea."},
    {"kind": "chat", "text": "Translate 'good morning' into Spanish."},
]
TOP = 32  # logits kept per step beyond the first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--out", default=Path(__file__).parent.parent / "tests" / "fixtures",
                    type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--logit-steps", type=int, default=3)
    args = ap.parse_args()

    folder, name = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 torch_dtype=torch.float32)
    model.eval()
    cases, first_logits = [], []
    for p in PROMPTS:
        if p["kind"] == "chat":
            ids = tok.apply_chat_template([{"role": "user", "content": p["text"]}],
                                          add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(p["text"])["input_ids"]
        ids = [int(i) for i in ids]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        gen = out.sequences[0, len(ids):].tolist()
        steps = []
        for logits in out.logits[: args.logit_steps]:
            row = logits[0].float().numpy()
            top = np.argsort(-row)[:TOP]
            steps.append({"ids": top.tolist(), "logits": row[top].tolist()})
        first_logits.append(out.logits[0][0].float().numpy())
        cases.append({**p, "prompt_ids": ids, "greedy_ids": gen, "steps": steps,
                      "text_out": tok.decode(gen, skip_special_tokens=True)})
        print(p["kind"], repr(p["text"]), "->", repr(cases[-1]["text_out"]))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"source": "transformers on " + name, "dtype": "float32",
            "max_new_tokens": args.max_new_tokens, "cases": cases}
    (args.out / "smollm2_golden.json").write_text(json.dumps(meta, indent=1))
    np.save(args.out / "smollm2_first_logits.npy", np.stack(first_logits).astype(np.float32))


if __name__ == "__main__":
    main()
