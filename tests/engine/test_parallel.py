"""Tensor and data parallelism on 8 host CPU devices: the same greedy tokens as one device,
each device holding only its shard of the KV cache, no collective on the KV cache or the
weights in the compiled step, no compilation after warm-up, and clear errors for meshes
that cannot work."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import pytest

from jaxserve import cli
from jaxserve.config import Config
from jaxserve.engine import runner as runner_module
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.errors import ConfigError
from jaxserve.loader import check_layer_arrays, load_model
from jaxserve.models.model_config import ModelConfig
from jaxserve.models.quant import STORAGE
from sharding.mesh import MeshConfig

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
TEXTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a village",
         "List three colors:", "Water boils at", "The quick brown fox jumps over the lazy")


def engine_on(config: Config, **mesh) -> Engine:
    config = config.replace(mesh=MeshConfig(**mesh))
    m = load_model(config, progress=False)
    return Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)


def greedy(engine: Engine, prompts: list[list[int]], params=GREEDY) -> dict[str, list[int]]:
    """All prompts at once (batched, and split over data shards); {id: generated ids}."""
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"r{i}")
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        for pt in engine.page_tables:
            pt.check_integrity()
    assert engine.stats().pages_used == 0
    return tokens


def assert_kv_shards(engine: Engine, kv_heads_per_device: int,
                     layers_per_device: int | None = None) -> None:
    """Every device holds its data shard's pages, its tensor rank's KV heads and its pipeline
    stage's layers, no more."""
    c, runner = engine.model_config, engine.runner
    layers = layers_per_device or c.num_layers
    local = (layers, runner.num_pages, runner.page_size, kv_heads_per_device, c.head_dim)
    for cache in (runner.state.k_pages, runner.state.v_pages):
        shards = cache.addressable_shards
        assert len(shards) == runner.mesh.devices.size
        assert all(s.data.shape == local for s in shards)


@pytest.fixture(scope="module")
def small_config(demo_config):
    """The demo at test size: 128-token context, 12 MiB of KV pages per device."""
    return demo_config.replace(cache__max_model_len=128, cache__kv_cache_memory=float(12 << 20),
                               runner__compilation_cache_dir=None)


@pytest.fixture(scope="module")
def demo_prompts(demo_model):
    return [demo_model.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def demo_reference(small_config, demo_prompts):
    return greedy(engine_on(small_config), demo_prompts)


@pytest.mark.parametrize("mesh,layers_per_device", [
    (dict(tensor=3), 30), (dict(data=2), 30), (dict(tensor=3, data=2), 30),
    (dict(pipeline=2), 15), (dict(pipeline=3), 10), (dict(pipeline=5), 6),
    (dict(pipeline=4), 8),  # 30 layers: 8, 8, 7, 7, the short stages padded to 8 slots
    (dict(pipeline=2, pipeline_layers=(20, 10)), 20),  # an explicit uneven split
    (dict(pipeline=2, tensor=3), 15), (dict(pipeline=3, data=2), 10),
], ids=["tensor3", "data2", "tensor3-data2", "pipeline2", "pipeline3", "pipeline5",
        "pipeline4-balanced", "pipeline2-explicit", "pipeline2-tensor3", "pipeline3-data2"])
def test_demo_model_gives_the_same_greedy_tokens_as_one_device(small_config, demo_prompts,
                                                                demo_reference, mesh,
                                                                layers_per_device):
    engine = engine_on(small_config, **mesh)
    assert greedy(engine, demo_prompts) == demo_reference
    assert_kv_shards(engine, kv_heads_per_device=3 // mesh.get("tensor", 1),
                     layers_per_device=layers_per_device)
    # Weights too: each stage holds its own layer slots only.
    q_proj = engine.runner.params["layers"]["attn"]["q_proj"]["kernel"]
    assert {s.data.shape[0] for s in q_proj.addressable_shards} == {layers_per_device}


def test_data_shards_each_run_their_own_sequences(small_config, demo_prompts):
    engine = engine_on(small_config, data=2)
    for i, ids in enumerate(demo_prompts[:4]):
        engine.add_request(ids, GREEDY, f"r{i}")
    engine.step()
    shards = sorted(r.shard for r in engine.scheduler.running)
    assert shards == [0, 0, 1, 1]  # least loaded first: two requests on each shard
    assert [pt.num_used_pages > 0 for pt in engine.page_tables] == [True, True]


# ----- a small random model with 8 KV heads: tensor 2, 4, 8 and replicated KV heads -------

def random_config(tmp_path, demo_config, num_kv_heads: int, num_heads: int = 8) -> Config:
    shape = ModelConfig("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=16, name=f"random-h{num_heads}-kv{num_kv_heads}")
    path = tmp_path / f"h{num_heads}-kv{num_kv_heads}.json"
    shape.save(path)
    return demo_config.replace(model__dtype="float32", checkpoint__source="random",
                               checkpoint__random_shape=str(path), cache__max_model_len=128,
                               cache__kv_cache_memory=float(1 << 20),
                               runner__compilation_cache_dir=None)


def random_prompts(n: int = 5) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 509 + 3 for j in range(5 + 9 * i)] for i in range(n)]


@pytest.mark.parametrize("num_kv_heads,tensor", [(8, 2), (2, 4)],
                         ids=["kv8-tensor2", "kv2-tensor4"])
def test_rope_kv_writer_runs_on_each_tensor_rank(tmp_path, demo_config, monkeypatch,
                                                 num_kv_heads, tensor):
    """Per-layer arrays on a tensor mesh: each rank's joined q/k/v go through the RoPE +
    K/V-write kernel (as the Pallas backends run it on GPUs; here in interpret mode, beside
    the reference attention), on its own q heads and its own (or replicated) KV heads: the
    tokens of one device running the same kernel."""
    from pallas_kernels.paged_attention import ragged_paged_attention_reference
    from pallas_kernels.rope_kv_write import rope_and_write_kv_interpret

    calls = []

    def writer(qkv, *args, num_heads, **kwargs):
        calls.append((qkv.shape[1], num_heads, args[2].shape[3]))  # heads, q heads, KV heads
        return rope_and_write_kv_interpret(qkv, *args, num_heads=num_heads, **kwargs)

    def attention_with_writer(*args, kv_writer=False, **kwargs):
        fn = functools.partial(ragged_paged_attention_reference)
        if kv_writer:
            fn.rope_kv_writer = writer
        return fn

    monkeypatch.setattr(runner_module, "pick_attention", attention_with_writer)
    config = random_config(tmp_path, demo_config, num_kv_heads).replace(
        runner__layer_arrays=True)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    ref = greedy(engine_on(config), random_prompts(3), params)
    assert calls and {c[1:] for c in calls} == {(8, num_kv_heads)}
    calls.clear()
    assert greedy(engine_on(config, tensor=tensor), random_prompts(3), params) == ref
    kv_local = max(num_kv_heads, tensor) // tensor  # replicated up to one a rank
    assert {c for c in calls} == {(8 // tensor + 2 * kv_local, 8 // tensor, kv_local)}


@pytest.mark.parametrize("num_kv_heads,tensor", [(8, 2), (8, 4), (8, 8), (2, 4)],
                         ids=["kv8-tensor2", "kv8-tensor4", "kv8-tensor8", "kv2-tensor4"])
def test_random_model_gives_the_same_greedy_tokens_on_any_tensor_size(tmp_path, demo_config,
                                                                       num_kv_heads, tensor):
    config = random_config(tmp_path, demo_config, num_kv_heads)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    one = engine_on(config)
    ref = greedy(one, random_prompts(), params)
    sharded = engine_on(config, tensor=tensor)
    assert greedy(sharded, random_prompts(), params) == ref
    # Replicated KV heads (2 heads on 4 devices): each device still holds exactly one.
    assert_kv_shards(sharded, kv_heads_per_device=max(1, num_kv_heads // tensor))
    assert sharded.runner.plan.kv_replicas == max(1, tensor // num_kv_heads)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_random_weights_are_made_quantized_and_shard(tmp_path, demo_config, mode):
    """checkpoint.source=random with model.quantization: the linear weights are made in the
    storage dtype (never whole in full precision), the same on one device and on tensor 2."""
    config = random_config(tmp_path, demo_config, 8).replace(model__quantization=mode)
    one = engine_on(config)
    q_proj = one.runner.params["layers"]["attn"]["q_proj"]
    assert q_proj["kernel"].dtype == STORAGE[mode]
    assert q_proj["kernel_scale"].shape == (2, 8, 16)  # layers x heads x head_dim
    assert float(jnp.min(q_proj["kernel_scale"])) > 0  # filled, not the ones of a placeholder
    ref = greedy(one, random_prompts())
    assert greedy(engine_on(config, tensor=2), random_prompts()) == ref


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2,
                    reason="needs two GPUs")
@pytest.mark.parametrize("num_kv_heads", [8, 1], ids=["kv8", "kv1-replicated"])
def test_pallas_on_two_gpus_gives_the_tokens_of_one(tmp_path, demo_config, num_kv_heads):
    # All layers unrolled, as every GPU config runs them (no while loop over the layers).
    config = random_config(tmp_path, demo_config, num_kv_heads).replace(
        runner__attention_backend="pallas", runner__scan_unroll=2)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    with jax.default_matmul_precision("highest"):
        ref = greedy(engine_on(config), random_prompts(), params)
        sharded = engine_on(config, tensor=2)
        assert greedy(sharded, random_prompts(), params) == ref
    assert_kv_shards(sharded, kv_heads_per_device=max(1, num_kv_heads // 2))


# ----- the compiled step: collectives, and no compilation after warm-up ------------------

COLLECTIVE = re.compile(r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute|"
                        r"reduce-scatter|collective-broadcast)(?:-start)?\(")


@pytest.mark.parametrize("mesh,quantization", [(dict(tensor=3, data=2), "none"),
                                               (dict(pipeline=2, tensor=3), "none"),
                                               (dict(tensor=3), "q8_0")],
                         ids=["tensor3-data2", "pipeline2-tensor3", "tensor3-q8_0"])
def test_compiled_step_moves_activations_only_and_never_recompiles(small_config, demo_prompts,
                                                                   mesh, quantization,
                                                                   mixed_sampling):
    """q8_0: the block scales of row-parallel weights are split with their weights, so the
    per-layer dequantization gathers nothing either."""
    engine = engine_on(small_config.replace(model__quantization=quantization), **mesh)
    engine.warm_up(progress=False)
    compiled = engine.runner.num_compilations
    c, runner = engine.model_config, engine.runner
    for tokens, seqs in runner.bucket_pairs():
        found = COLLECTIVE.findall(runner.compiled_text(tokens, seqs))
        kinds = sorted({kind for _, kind in found})
        expected = ["all-gather", "all-reduce"] + (["collective-permute"]
                                                   if runner.stages > 1 else [])
        assert kinds == expected, kinds
        for shape, kind in found:
            if kind == "all-reduce":  # o_proj, down_proj and the embedding: [tokens, hidden]
                assert shape.startswith(f"f32[{tokens},{c.hidden_size}]"), shape
            elif kind == "all-gather":  # the LM head's vocabulary slices: logits, not weights
                assert shape.startswith(f"f32[{seqs},{c.vocab_size}]"), shape
            else:  # stage to stage: activations [tokens, hidden] and sampled tokens
                assert shape.startswith((f"f32[{tokens},{c.hidden_size}]",
                                         f"s32[{runner.max_seqs}]")), shape
    mixed = mixed_sampling
    for i, (ids, p) in enumerate(zip(demo_prompts, mixed, strict=True)):
        engine.add_request(ids, p, f"m{i}")
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.num_compilations == compiled
    assert engine.stats().pages_used == 0


# ----- meshes that cannot work: one clear error, before any weight is read ---------------

@pytest.mark.parametrize("mesh,heads,kv,message", [
    (dict(tensor=16), 8, 8, r"mesh \(data=1, pipeline=1, tensor=16, expert=1\) needs 16 "
                            r"devices, but only 8 cpu devices are available"),
    (dict(tensor=3, data=3), 8, 8, r"needs 9 devices, but only 8"),
    (dict(tensor=3), 8, 8, r"mesh.tensor=3: num_heads=8 is not divisible by tensor=3"),
    (dict(tensor=4), 12, 6, r"mesh.tensor=4: num_kv_heads=6 is not divisible by tensor=4"),
    (dict(tensor=4), 12, 3, r"mesh.tensor=4: num_kv_heads=3 is fewer than tensor=4 and does "
                            r"not divide it"),
    (dict(tensor=8), 8, 4, None),  # 4 KV heads on 8 devices: each replicated twice, fine
    (dict(pipeline=2, pipeline_layers=(1, 2)), 8, 8,
     r"mesh.pipeline_layers=\[1, 2\] must give each of the 2 stages at least one layer "
     r"and sum to num_layers=2"),
    (dict(pipeline=3), 8, 8, r"mesh.pipeline=3: more stages than num_layers=2"),
    (dict(expert=2), 8, 8, r"mesh.expert=2: llama is a dense model"),
])
def test_bad_meshes_are_config_errors_naming_the_numbers(tmp_path, demo_config, mesh, heads,
                                                         kv, message):
    config = random_config(tmp_path, demo_config, kv, heads).replace(mesh=MeshConfig(**mesh))
    if message is None:
        assert load_model(config, progress=False).params
        return
    with pytest.raises(ConfigError, match=message):
        load_model(config, progress=False)


def test_serve_on_a_bad_mesh_exits_2_with_one_line(demo_config, tmp_path, capsys):
    data = json.loads(json.dumps({"model": {"name": "SmolLM2-135M-Instruct",
                                            "dtype": "float32"},
                                  "checkpoint": {"cache_dir": demo_config.checkpoint.cache_dir},
                                  # no metrics port: a server holding the default one
                                  # must not change the error this checks
                                  "server": {"metrics_port": None},
                                  "mesh": {"tensor": 2}}))
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    code = cli.main(["serve", "--config", str(path), "--port", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("jaxserve serve: error: mesh.tensor=2: num_heads=9 is not divisible by "
                   "tensor=2")


def test_layer_arrays_give_the_same_tokens_on_a_mesh(small_config, demo_prompts, demo_reference):
    """runner.layer_arrays: each layer's weights are arrays of their own (no stacked
    `layers` axis), sharded as the stacked ones were, q/k/v and gate/up joined on each
    tensor rank, and greedy tokens do not change."""
    engine = engine_on(small_config.replace(runner__layer_arrays=True), tensor=3)
    params = engine.runner.params
    assert "layers" not in params and len([k for k in params if k.startswith("layers_")]) == 30
    c = engine.model_config
    attn, mlp = params["layers_7"]["attn"], params["layers_7"]["mlp"]
    assert "q_proj" not in attn and "gate_proj" not in mlp
    qkv = attn["qkv_proj"]["kernel"]  # each rank: its 3 q heads, then its k and v heads
    assert qkv.shape == (c.hidden_size, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
    assert {s.data.shape for s in qkv.addressable_shards} == {
        (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) // 3, c.head_dim)}
    assert {s.data.shape for s in mlp["gate_up_proj"].addressable_shards} == {
        (c.hidden_size, 2, c.intermediate_size // 3)}
    o_proj = params["layers_7"]["attn"]["o_proj"]
    assert o_proj.shape == (c.num_heads, c.head_dim, c.hidden_size)
    assert {s.data.shape for s in o_proj.addressable_shards} == {
        (c.num_heads // 3, c.head_dim, c.hidden_size)}
    assert greedy(engine, demo_prompts) == demo_reference


def test_layer_arrays_join_qkv_where_heads_are_not_split(small_config, demo_prompts,
                                                         demo_reference):
    """On one tensor rank (here two data shards) each layer's q/k/v weights become one
    `qkv_proj` weight, in the checkpoint's head order, and its gate/up one `gate_up_proj`,
    one GEMM each; greedy tokens do not change."""
    engine = engine_on(small_config.replace(runner__layer_arrays=True), data=2)
    layer = engine.runner.params["layers_7"]
    attn, mlp = layer["attn"], layer["mlp"]
    c = engine.model_config
    assert "q_proj" not in attn and "k_proj" not in attn and "v_proj" not in attn
    assert attn["qkv_proj"]["kernel"].shape == (c.hidden_size, c.num_heads + 2 * c.num_kv_heads,
                                                c.head_dim)
    assert "gate_proj" not in mlp and "up_proj" not in mlp
    assert mlp["gate_up_proj"].shape == (c.hidden_size, 2, c.intermediate_size)
    assert greedy(engine, demo_prompts) == demo_reference


@pytest.mark.parametrize("mesh", [dict(tensor=3), dict(data=2)], ids=["tensor3", "data2"])
def test_layer_loop_gives_the_same_tokens(small_config, demo_prompts, demo_reference, mesh):
    """runner.layer_loop: the per-layer arrays run by one loop body, each matmul picking its
    layer's weight by lax.switch; q/k/v joined, shard by shard over tensor ranks."""
    config = small_config.replace(runner__layer_arrays=True, runner__layer_loop=True)
    assert greedy(engine_on(config, **mesh), demo_prompts) == demo_reference


@pytest.mark.parametrize("mesh", [dict(tensor=3), dict(data=2)], ids=["tensor3", "data2"])
def test_transposed_weights_give_the_same_tokens(small_config, demo_prompts, demo_reference,
                                                 mesh):
    """runner.transposed_weights: the linear weights stored outputs-first (split over tensor
    ranks on the axes they were split on), in the layer loop; the prefill chunks take the
    x . W^T form and the decodes the W . x^T one."""
    config = small_config.replace(runner__layer_arrays=True, runner__layer_loop=True,
                                  runner__transposed_weights=True)
    engine = engine_on(config, **mesh)
    attn = engine.runner.params["layers_0"]["attn"]
    c = engine.model_config
    qkv = attn["qkv_proj"]["kernel"]  # [heads, head_dim, embed], heads split over tensor
    assert qkv.shape == (c.num_heads + 2 * c.num_kv_heads, c.head_dim, c.hidden_size)
    if mesh.get("tensor"):
        assert qkv.sharding.spec[0] == "tensor"
    assert attn["o_proj"].shape == (c.hidden_size, c.num_heads, c.head_dim)
    assert greedy(engine, demo_prompts) == demo_reference


# f32 arrays of a demo weight's shape (one layer's, joined or not; the tied embedding)
WEIGHT_SHAPES = {"576,15,64", "576,960", "9,64,576", "576,576", "576,2,1536", "576,3072",
                 "576,1536", "1536,576", "576,9,64", "576,3,64", "576,192", "49152,576",
                 "576,49152", "15,64,576", "2,1536,576", "3072,576", "960,576"}
RESULT = re.compile(r"= f32\[([\d,]+)\]\S* ([a-z][\w.-]*)\(")


def weight_copies(hlo: str) -> list[str]:
    """The ops of a compiled step that produce an array of a weight's shape: copies (a
    parameter, a bitcast or a tuple's element is the weight itself)."""
    found = []
    for line in hlo.splitlines():
        m = RESULT.search(line)
        if m and m.group(1) in WEIGHT_SHAPES and m.group(2).split(".")[0] not in (
                "parameter", "get-tuple-element", "bitcast", "tuple"):
            found.append(line.strip()[:120])
    return found


def test_layer_loop_copies_no_weight(small_config):
    """In the layer scan XLA's CPU backend copies each weight out of its stack before the
    matmul (every step, every layer); in the layer loop's program no op makes a weight-sized
    array at all."""
    scan = engine_on(small_config).runner.compiled_text(16, 4)
    assert len(weight_copies(scan)) >= 4  # q/k/v, o, gate, up, down slices of the stacks
    loop = engine_on(small_config.replace(runner__layer_arrays=True, runner__layer_loop=True))
    assert weight_copies(loop.runner.compiled_text(16, 4)) == []
    transposed = engine_on(small_config.replace(runner__layer_arrays=True,
                                                runner__layer_loop=True,
                                                runner__transposed_weights=True))
    assert weight_copies(transposed.runner.compiled_text(16, 4)) == []
    assert weight_copies(transposed.runner.compiled_text(64, 4)) == []


def test_one_device_runs_no_collectives(small_config):
    """Over a mesh axis of one device a collective is a copy on XLA's CPU backend (61 a
    step on the demo), so the model is built without the tensor axis there. (Split over
    devices, the collectives are checked above, in
    test_compiled_step_moves_activations_only_and_never_recompiles.)"""
    config = small_config.replace(runner__layer_arrays=True, runner__layer_loop=True)
    runner = engine_on(config).runner
    for tokens, seqs in runner.bucket_pairs():
        assert COLLECTIVE.findall(runner.compiled_text(tokens, seqs)) == []


def test_layer_loop_and_transposed_weights_need_layer_arrays_and_dense_layers(small_config):
    with pytest.raises(ValueError, match=r"layer_loop: needs runner.layer_arrays: true"):
        small_config.replace(runner__layer_loop=True)
    moe = ModelConfig("mixtral", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32)
    config = small_config.replace(runner__layer_arrays=True, runner__layer_loop=True)
    with pytest.raises(ConfigError, match=r"runner.layer_loop: true cannot be used with .*MoE"):
        check_layer_arrays(config, moe)
    with pytest.raises(ValueError, match=r"transposed_weights: needs runner.layer_arrays: true"):
        small_config.replace(runner__transposed_weights=True)
    config = small_config.replace(runner__layer_arrays=True, runner__transposed_weights=True)
    with pytest.raises(ConfigError, match=r"runner.transposed_weights: true cannot be used "
                                          r"with .*: expert weights keep their layout"):
        check_layer_arrays(config, moe)


def test_layer_arrays_refuse_pipeline_stages(small_config):
    with pytest.raises(ConfigError, match=r"layer_arrays.*mesh.pipeline=2"):
        engine_on(small_config.replace(runner__layer_arrays=True), pipeline=2)
