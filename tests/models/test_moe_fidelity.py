"""Tiny seeded HF models (tests/fixtures/tiny_hf, from scripts/make_moe_fixtures.py) converted
with `jaxserve convert`: the same greedy tokens as transformers (float32) on one device and
with the experts sharded over 2 and 4 devices, alone and with tensor parallelism; the same
router top-k choices as transformers on the first prefill; no compilation after warm-up."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from paged_steps import one_sequence

from jaxserve import cli
from jaxserve.checkpoint import orbax_store
from jaxserve.engine.llm import LLM
from jaxserve.engine.request import SamplingParams
from jaxserve.models.llama import LlamaModel
from pallas_kernels.paged_attention import ragged_paged_attention_reference
from sharding.mesh import MeshConfig, make_mesh

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_hf"
GOLDEN = json.loads((FIXTURES / "golden.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{name: converted checkpoint dir}, each made by the `jaxserve convert` command."""
    out = {}
    for name in GOLDEN:
        dest = tmp_path_factory.mktemp("moe") / name
        assert cli.main(["convert", str(FIXTURES / name), str(dest), "--dtype", "float32"]) == 0
        out[name] = dest
    return out


def config_for(demo_config, checkpoint, **mesh):
    return demo_config.replace(
        checkpoint__source=str(checkpoint), model__name=checkpoint.name, model__dtype="float32",
        runner__token_buckets=(16, 64), runner__seq_buckets=(4,), scheduler__max_num_seqs=4,
        scheduler__max_num_batched_tokens=64, cache__max_model_len=128,
        cache__kv_cache_memory=float(1 << 20), runner__compilation_cache_dir=None,
        mesh=MeshConfig(**mesh))


MESHES = {"one-device": {}, "expert2": {"expert": 2}, "expert4": {"expert": 4},
          "expert2-tensor2": {"expert": 2, "tensor": 2}, "expert2-data2": {"expert": 2, "data": 2},
          # the 8-GPU meshes of the scale-out runs (scripts/bench_scaleout.sh)
          "expert8": {"expert": 8}, "expert4-tensor2": {"expert": 4, "tensor": 2}}


@pytest.mark.parametrize("mesh", [*MESHES.values(), {"pipeline": 2, "expert": 2}],
                         ids=[*MESHES, "pipeline2-expert2"])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_greedy_tokens_match_transformers(demo_config, converted, name, mesh):
    if name == "qwen3_moe" and "pipeline" in mesh:
        pytest.skip("a model mixing dense and MoE layers takes no pipeline stages")
    llm = LLM(config_for(demo_config, converted[name], **mesh), warm_up=True, progress=False)
    compiled = llm.engine.runner.num_compilations
    cases = GOLDEN[name]["cases"]
    outs = llm.generate([c["prompt_ids"] for c in cases],
                        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for case, out in zip(cases, outs, strict=True):
        assert out.token_ids[:len(case["greedy_ids"])] == case["greedy_ids"], case["prompt"]
    assert llm.engine.runner.num_compilations == compiled  # nothing compiled after warm-up
    if mesh.get("expert"):  # each device holds only its experts, and its columns of them
        ep, tp, pp = mesh["expert"], mesh.get("tensor", 1), mesh.get("pipeline", 1)
        params = llm.engine.runner.params
        gate = params["layers"]["moe"]["gate_proj"] if name == "mixtral" else \
            params["moe"]["gate_proj"]
        full = gate.shape
        assert {s.data.shape for s in gate.addressable_shards} == {
            (full[0] // pp, full[1] // ep, full[2], full[3] // tp)}


def test_dense_qwen3_matches_transformers(demo_config, converted):
    llm = LLM(config_for(demo_config, converted["qwen3"]), progress=False)
    cases = GOLDEN["qwen3"]["cases"]
    outs = llm.generate([c["prompt_ids"] for c in cases],
                        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert [o.token_ids[:len(c["greedy_ids"])] for o, c in zip(outs, cases, strict=True)] == \
        [c["greedy_ids"] for c in cases]


def test_prompts_and_chat_template_match_transformers(demo_config, converted):
    """The tokenizer and the chat template (from chat_template.jinja) give the same ids."""
    llm = LLM(config_for(demo_config, converted["qwen3_moe"]), progress=False)
    tok = llm.tokenizer
    for case in GOLDEN["qwen3_moe"]["cases"]:
        p = case["prompt"]
        if p["kind"] == "chat":
            ids = tok.encode_chat([{"role": "user", "content": p["text"]}])
        else:
            ids = tok.encode(p["text"])
        assert ids == case["prompt_ids"]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_router_topk_matches_transformers_on_the_first_prefill(converted, name):
    golden = GOLDEN[name]
    assert golden["router_min_margin"] > 1e-4  # the choices are not near-ties
    mesh = make_mesh(MeshConfig())
    config, params = orbax_store.load(converted[name], mesh)
    ids = np.asarray(golden["cases"][0]["prompt_ids"], np.int32)
    n, page_size = len(ids), 16
    pages = np.arange(1, -(-n // page_size) + 1, dtype=np.int32)
    meta = one_sequence(pages, 0, n, page_size)
    kv_shape = (config.num_layers, len(pages) + 1, page_size, config.num_kv_heads,
                config.head_dim)
    kv = (jnp.zeros(kv_shape), jnp.zeros(kv_shape))
    model = LlamaModel(config, jnp.float32, ragged_paged_attention_reference)
    _, state = model.apply({"params": params}, jnp.asarray(ids), kv, meta,
                           jnp.asarray([n - 1], jnp.int32), mutable="intermediates")
    (routed,) = state["intermediates"]["layers"]["routed_experts"]  # [layers, T, k]
    ours = [np.sort(np.asarray(routed[i]), axis=-1).tolist() for i in config.moe_layers]
    assert ours == golden["router_topk"]
    if config.dense_layers:  # a dense layer routes nothing
        assert (np.asarray(routed[config.dense_layers[0]]) == -1).all()


@pytest.mark.parametrize("name,mesh,message", [
    ("mixtral", {"expert": 3}, "mesh.expert=3: num_experts=8 is not divisible by expert=3"),
    ("qwen3_moe", {"pipeline": 2}, r"mesh.pipeline=2: qwen3_moe mixes dense layers \[2\]"),
    ("qwen3", {"expert": 2}, "mesh.expert=2: qwen3 is a dense model"),
    ("mixtral", {"tensor": 3}, "num_heads=4 is not divisible by tensor=3"),
])
def test_bad_meshes_are_config_errors(demo_config, converted, name, mesh, message):
    from jaxserve.errors import ConfigError
    from jaxserve.loader import load_model

    with pytest.raises(ConfigError, match=message):
        load_model(config_for(demo_config, converted[name], **mesh), progress=False)
