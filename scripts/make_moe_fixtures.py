"""Write tiny seeded Hugging Face models (Mixtral, Qwen3-MoE mixing dense and MoE layers,
dense Qwen3) with a real byte-level BPE tokenizer, and their golden outputs from
transformers (float32): greedy tokens, and the experts each MoE layer routes the first
prompt's prefill tokens to.

Runs in the same Python 3.11 environment as scripts/make_golden_fixtures.py:
    REF/bin/python scripts/make_moe_fixtures.py
Writes tests/fixtures/tiny_hf/<name>/ (config.json, model.safetensors, tokenizer files,
chat_template.jinja) and tests/fixtures/tiny_hf/golden.json.

Random weights give flat distributions: the LM head is scaled up (x8) and the routers get a
larger spread, so greedy and routing choices are seldom near-ties; each case keeps its tokens
only up to the first step whose top-2 logit gap is under GAP, and the routing margin (the
gap between the k-th and (k+1)-th router probability) is recorded for the test to respect.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Mixture of experts models route every token to a few experts out of many.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "List three colors: red, green and blue. List three animals: cat, dog and horse.",
] * 20
PROMPTS = [
    {"kind": "raw", "text": "The capital of France is"},
    {"kind": "raw", "text": "Once upon a time, in a small"},
    {"kind": "chat", "text": "List three colors."},
]
VOCAB = 384
GAP = 1e-3  # a top-2 logit gap below this is a near-tie: later tokens are not compared
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)


def configs():
    return {
        "mixtral": MixtralConfig(**COMMON, num_hidden_layers=3, num_local_experts=8,
                                 num_experts_per_tok=2, rope_theta=10000.0),
        # layer 2 keeps a dense MLP (mlp_only_layers); top-k weights not renormalised
        "qwen3_moe": Qwen3MoeConfig(**COMMON, num_hidden_layers=4, head_dim=16,
                                    num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, mlp_only_layers=[2],
                                    norm_topk_prob=False),
        "qwen3": Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=16),
    }


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with decisive greedy and routing choices (see the docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(8 * 0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def encode(tok, prompt) -> list[int]:
    if prompt["kind"] == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": prompt["text"]}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt["text"])["input_ids"]


def golden(model, tok, max_new: int) -> dict:
    cases = []
    for prompt in PROMPTS:
        ids = [int(i) for i in encode(tok, prompt)]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(ids):].tolist()
        keep = len(new)
        for step, logits in enumerate(out.logits):
            top2 = torch.topk(logits[0], 2).values
            if float(top2[0] - top2[1]) < GAP:
                keep = step + 1  # this step's choice is a near-tie: compare up to it only
                break
        cases.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": new[:keep]})
    result = {"cases": cases}
    if getattr(model.config, "num_experts_per_tok", None):
        with torch.no_grad():
            out = model(torch.tensor([cases[0]["prompt_ids"]]), output_router_logits=True)
        k = model.config.num_experts_per_tok
        routed, margins = [], []
        for logits in out.router_logits:  # one [T, experts] per MoE layer
            probs = torch.softmax(logits.float(), dim=-1)
            top = torch.topk(probs, k + 1)
            routed.append(sorted(row[:k]) for row in top.indices.tolist())
            margins.append(float((top.values[:, k - 1] - top.values[:, k]).min()))
        result["router_topk"] = [[list(r) for r in layer] for layer in routed]
        result["router_min_margin"] = min(margins)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent.parent / "tests" / "fixtures" / "tiny_hf")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    tok = make_tokenizer()
    results = {}
    for seed, (name, config) in enumerate(configs().items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        init_weights(model, seed)
        folder = args.out / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        # the reference is a fresh load of what was saved, as a user would load it
        fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        results[name] = golden(fresh, tok, args.max_new_tokens)
        n = [len(c["greedy_ids"]) for c in results[name]["cases"]]
        print(f"{name}: greedy tokens kept per prompt {n}, "
              f"router margin {results[name].get('router_min_margin')}")
    (args.out / "golden.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
