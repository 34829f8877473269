"""The demo model against Hugging Face transformers on the same GGUF (fixtures written by
scripts/make_golden_fixtures.py): same prompt ids, same greedy ids, same first logits."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import load_config
from jaxserve.engine.input_processor import InputProcessor
from jaxserve.engine.request import SamplingParams
from jaxserve.models.llama import AttentionMetadata, LlamaModel
from pallas_kernels.paged_attention import ragged_paged_attention_reference

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
DEMO_CONFIG = pathlib.Path(__file__).parent.parent / "configs" / "smollm2-135m-cpu.yaml"
GOLDEN = json.loads((FIXTURES / "smollm2_golden.json").read_text())
CASES = GOLDEN["cases"]


def _encode(tokenizer, case):
    return InputProcessor(tokenizer, 2048).encode(case["text"], chat=case["kind"] == "chat")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["kind"] + ":" + c["text"][:20])
def test_prompt_ids_match_transformers(demo_model, case):
    assert _encode(demo_model.tokenizer, case) == case["prompt_ids"]


def assert_greedy_ids_match_transformers(llm):
    prompts = [_encode(llm.tokenizer, c) for c in CASES]
    params = SamplingParams(max_tokens=GOLDEN["max_new_tokens"], temperature=0.0)
    outs = llm.generate(prompts, params)
    for case, out in zip(CASES, outs, strict=True):
        assert out.token_ids == case["greedy_ids"], case["text"]
        assert out.text == case["text_out"], case["text"]


def test_greedy_ids_match_transformers(demo_llm):
    assert_greedy_ids_match_transformers(demo_llm)


def test_greedy_ids_match_transformers_in_the_demos_layer_loop(demo_config):
    """The same, with the demo config's own runner layout (per-layer arrays run by one loop
    body, q/k/v and gate/up joined, stored outputs-first)."""
    from jaxserve.engine.llm import LLM

    demo = load_config(DEMO_CONFIG).runner
    assert demo.layer_arrays and demo.layer_loop and demo.transposed_weights
    assert_greedy_ids_match_transformers(
        LLM(demo_config.replace(runner__layer_arrays=True, runner__layer_loop=True,
                                runner__transposed_weights=True), progress=False))


def test_first_step_logits_match_transformers(demo_model):
    """One prefill of each prompt through the model; logits vs HF's, float32."""
    cfg, params = demo_model.model_config, demo_model.params
    expected = np.load(FIXTURES / "smollm2_first_logits.npy")
    model = LlamaModel(cfg, jnp.float32, ragged_paged_attention_reference)
    page_size, num_pages = 16, 8
    for case, want in zip(CASES, expected, strict=True):
        ids = np.asarray(case["prompt_ids"], np.int32)
        n = len(ids)
        assert n <= page_size * (num_pages - 1)
        kv_shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        kv = (jnp.zeros(kv_shape), jnp.zeros(kv_shape))
        pages = np.arange(1, num_pages, dtype=np.int32)  # page 0 is the null page
        meta = AttentionMetadata(
            positions=jnp.arange(n, dtype=jnp.int32),
            slot_mapping=jnp.asarray(pages[np.arange(n) // page_size] * page_size
                                     + np.arange(n) % page_size),
            page_tables=jnp.asarray(pages[None, :]),
            seq_lens=jnp.asarray([n], jnp.int32),
            query_start=jnp.asarray([0, n], jnp.int32),
        )
        logits, _ = model.apply({"params": params}, jnp.asarray(ids), kv, meta,
                                jnp.asarray([n - 1], jnp.int32))
        got = np.asarray(logits[0])
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)
        assert int(got.argmax()) == int(want.argmax())


def test_first_step_logprobs_through_the_engine(demo_llm):
    """Top logprobs the engine reports equal log_softmax of HF's first-step logits."""
    expected = np.load(FIXTURES / "smollm2_first_logits.npy")
    prompts = [_encode(demo_llm.tokenizer, c) for c in CASES[:3]]
    outs = demo_llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    for want, out in zip(expected[:3], outs, strict=True):
        ref = want - (want.max() + np.log(np.exp(want - want.max()).sum()))
        top = out.logprobs[0].top
        assert [t for t, _ in top] == list(np.argsort(-ref)[:5])
        np.testing.assert_allclose([lp for _, lp in top], np.sort(ref)[::-1][:5], atol=2e-3)
