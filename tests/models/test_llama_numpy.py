"""The model on small random configs against a plain-numpy forward pass written here,
covering what the demo model does not: Llama-3 rope scaling, Qwen2 biases, untied
embeddings, GQA ratios, and a prefill split into chunks over the paged cache."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_steps import one_sequence
from random_models import random_params

from jaxserve.models import transposed
from jaxserve.models.llama import (
    LlamaModel,
    _join_heads,
    flatten_params,
    fuse_gate_up,
    fuse_qkv,
    nest_params,
    split_layers,
    transpose_weights,
)
from jaxserve.models.model_config import ModelConfig, RopeScaling
from jaxserve.models.quant import KV_STORAGE
from jaxserve.models.transposed import Transposed
from pallas_kernels.paged_attention import ragged_paged_attention_reference
from pallas_kernels.rope_kv_write import rope_and_write_kv_interpret

CONFIGS = {
    "llama3-scaled-untied": ModelConfig(
        "llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
        num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16), tie_word_embeddings=False),
    "qwen2-bias-tied": ModelConfig(
        "qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
        num_heads=4, num_kv_heads=4, head_dim=8, rms_norm_eps=1e-6, attention_bias=True,
        tie_word_embeddings=True),
    "mistral-gqa8": ModelConfig(
        "mistral", vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=8, num_kv_heads=1, head_dim=16),
}


def np_inv_freq(c: ModelConfig) -> np.ndarray:
    d = c.head_dim
    inv = 1.0 / c.rope_theta ** (np.arange(0, d, 2) / d)
    s = c.rope_scaling
    if s is None:
        return inv
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return np.array(out)


def np_forward(c: ModelConfig, p: dict, ids: np.ndarray) -> np.ndarray:
    """Logits of every position, plain numpy, float64, full causal attention."""
    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * w

    def rope(x):  # [T, N, D]
        ang = np.arange(len(ids))[:, None] * np_inv_freq(c)[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x1, x2 = x[..., : c.head_dim // 2], x[..., c.head_dim // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    L = p["layers"]
    x = p["embedding"][ids]
    T, G = len(ids), c.num_heads // c.num_kv_heads
    for i in range(c.num_layers):
        a = L["attn"]
        h = rms(x, L["attn_norm"]["scale"][i])
        q = np.einsum("te,ehd->thd", h, a["q_proj"]["kernel"][i])
        k = np.einsum("te,ehd->thd", h, a["k_proj"]["kernel"][i])
        v = np.einsum("te,ehd->thd", h, a["v_proj"]["kernel"][i])
        if c.attention_bias:
            q, k, v = (q + a["q_proj"]["bias"][i], k + a["k_proj"]["bias"][i],
                       v + a["v_proj"]["bias"][i])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(c.head_dim)
        s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", w, v)
        x = x + np.einsum("thd,hde->te", o, a["o_proj"][i])
        h = rms(x, L["mlp_norm"]["scale"][i])
        m = L["mlp"]
        g = h @ m["gate_proj"][i]
        x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"][i])) @ m["down_proj"][i]
    x = rms(x, p["final_norm"]["scale"])
    head = p["embedding"].T if c.tie_word_embeddings else p["lm_head"]
    return x @ head


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunks", [(11,), (4, 1, 6)], ids=["one-prefill", "chunked"])
@pytest.mark.parametrize("kv_rotation", [False, True], ids=["plain", "rotated"])
def test_model_matches_numpy(name, chunks, kv_rotation):
    """With kv_rotation (Q, K, V rotated by a Hadamard matrix, the output back) and a float
    cache, nothing is rounded: the logits are the numpy forward's all the same."""
    check_against_numpy(name, chunks, kv_rotation=kv_rotation)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("layer_arrays", [True, False], ids=["layer-arrays", "stacked"])
def test_joined_weights_match_numpy(name, layer_arrays):
    """q/k/v joined into one weight per layer (biases too, for Qwen2) and gate/up into
    another, on per-layer arrays (as the loader makes them for runner.layer_arrays on one
    tensor rank) or stacked."""
    check_against_numpy(name, (4, 1, 6), joined=True, layer_arrays=layer_arrays)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("joined", [True, False], ids=["joined", "apart"])
def test_layer_loop_matches_numpy(name, joined):
    """runner.layer_loop: per-layer weight arrays run by one loop body, each matmul picking
    its layer's weight by lax.switch (q/k/v and gate/up joined or apart; norms and Qwen2's
    biases picked out of stacks)."""
    check_against_numpy(name, (4, 1, 6), joined=joined, layer_arrays=True, layer_loop=True)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("loop", [True, False], ids=["loop", "unrolled"])
@pytest.mark.parametrize("joined", [True, False], ids=["joined", "apart"])
def test_transposed_weights_match_numpy(name, loop, joined):
    """runner.transposed_weights: each linear weight stored outputs-first and multiplied as
    W . x^T (the 1-token and 4-token chunks) or x . W^T (a 40-token chunk, more than
    SMALL_ROWS), in the layer loop or unrolled."""
    check_against_numpy(name, (4, 1, 40), joined=joined, layer_arrays=True, layer_loop=loop,
                        transposed=True)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_transposed_matmul_form_by_backend(backend, monkeypatch):
    """On a CPU a Transposed weight is multiplied as W . x^T (between optimization barriers)
    up to SMALL_ROWS rows and as x . W^T above; off a CPU as x . W^T at every row count.
    Both forms give the same product."""
    monkeypatch.setattr(transposed.jax, "default_backend", lambda: backend)
    rng = np.random.default_rng(0)
    w = Transposed(jnp.asarray(rng.standard_normal((48, 16)), jnp.float32), 1)  # [N, K]
    for rows in (1, 8, transposed.SMALL_ROWS, transposed.SMALL_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32)
        fn = jax.jit(lambda x, w: transposed.transposed_einsum("tk,kn->tn", x, w))
        barriers = fn.lower(x, w).as_text().count("optimization_barrier")
        small_form = backend == "cpu" and rows <= transposed.SMALL_ROWS
        assert barriers == (2 if small_form else 0), (backend, rows)
        np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(x) @ np.asarray(w.weight).T,
                                   rtol=1e-5, atol=1e-5)


def test_transposed_int8_activations_contract_x_as_it_lies_on_a_cpu(monkeypatch):
    """int8 activations (s8 x s8) on a CPU up to SMALL_ROWS rows: W [N, K] . x [M, K]^T,
    both operands contracted on their last axis, with no barrier and no transpose of x
    before the dot (the float form's barriers made XLA's CPU backend run the integer dot
    2-5x slower); the int32 product is numpy's."""
    monkeypatch.setattr(transposed.jax, "default_backend", lambda: "cpu")
    rng = np.random.default_rng(1)
    w = Transposed(jnp.asarray(rng.integers(-127, 128, (48, 16)), jnp.int8), 1)  # [N, K]
    for rows in (2, 8, transposed.SMALL_ROWS):
        x = jnp.asarray(rng.integers(-127, 128, (rows, 16)), jnp.int8)
        fn = jax.jit(lambda x, w: transposed.transposed_einsum(
            "tk,kn->tn", x, w, preferred_element_type=jnp.int32))
        text = fn.lower(x, w).as_text()
        assert "optimization_barrier" not in text, rows
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert len(dots) == 1 and "contracting_dims = [1] x [1]" in dots[0], dots
        assert f"tensor<48x16xi8>, tensor<{rows}x16xi8>" in dots[0], dots
        np.testing.assert_array_equal(
            np.asarray(fn(x, w)), np.asarray(x, np.int64) @ np.asarray(w.weight, np.int64).T)


def test_transpose_weights_puts_outputs_first():
    """Each layer's q/k/v kernels, gate and up become [outputs, embed], o_proj [embed, heads,
    head_dim] and down [embed, mlp]; biases, norms, scales, the embedding and a q8_0 weight
    stay."""
    c = CONFIGS["qwen2-bias-tied"]
    flat = split_layers(jax.tree.map(jnp.asarray, flatten_params(random_params(c, seed=3))),
                        c.num_layers)
    # a q8_0 block scale (the weight's rank) keeps its weight's layout; a per-channel one not
    down = flat["layers_0/mlp/down_proj"].shape
    flat["layers_0/mlp/down_proj_scale"] = jnp.ones((down[0] // 8, down[1]))
    q = flat["layers_0/attn/q_proj/kernel"].shape
    flat["layers_0/attn/q_proj/kernel_scale"] = jnp.ones((q[0] // 8, *q[1:]))
    flat["layers_1/attn/o_proj_scale"] = jnp.ones((c.hidden_size,))
    want = {k: np.asarray(v) for k, v in flat.items()}
    out = transpose_weights(dict(flat))
    assert sorted(out) == sorted(want)
    for path, value in out.items():
        leaf = path.split("/")[-2 if path.endswith("/kernel") else -1]
        if path in ("layers_0/mlp/down_proj", "layers_0/attn/q_proj/kernel"):
            np.testing.assert_array_equal(value, want[path])
        elif leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            np.testing.assert_array_equal(value, np.moveaxis(want[path], 0, -1))
        elif leaf in ("o_proj", "down_proj"):
            np.testing.assert_array_equal(value, np.moveaxis(want[path], -1, 0))
        else:
            np.testing.assert_array_equal(value, want[path])
    assert out["layers_0/attn/o_proj"].shape == (c.hidden_size, c.num_heads, c.head_dim)


@pytest.mark.parametrize("name", CONFIGS)
def test_rope_and_kv_written_by_the_pallas_kernel_match_numpy(name):
    """RoPE and the K/V writes done by pallas_kernels/rope_kv_write.py (interpret mode) in
    place of the model's own ops, as the Pallas backends do on GPU with per-layer weight
    arrays and joined q/k/v: the same logits, chunk by chunk."""
    attention = functools.partial(ragged_paged_attention_reference)
    attention.rope_kv_writer = rope_and_write_kv_interpret
    check_against_numpy(name, (4, 1, 6), joined=True, layer_arrays=True, attention=attention)


def fresh_from_rows(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start, *,
                    sm_scale, k_new, v_new, **kwargs):
    """An attention that takes this step's K/V rows, as the flash path does: a chunk that is
    its sequence's whole context (one sequence here) attends k_new/v_new alone, causally;
    any later chunk reads the pages (the reference)."""
    paged = ragged_paged_attention_reference(q, k_pages, v_pages, layer, page_tables,
                                             seq_lens, query_start, sm_scale=sm_scale)
    group = q.shape[1] // k_new.shape[1]
    k, v = (jnp.repeat(x, group, axis=1) for x in (k_new, v_new))
    scores = jnp.einsum("thd,shd->hts", q, k) * sm_scale
    t = jnp.arange(q.shape[0])
    scores = jnp.where(t[None, :, None] >= t[None, None, :], scores, -jnp.inf)
    fresh = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
    return jnp.where(query_start[1] == seq_lens[0], fresh.astype(paged.dtype), paged)


fresh_from_rows.takes_new_kv = True


def test_rope_kv_writer_gives_the_rotated_k_rows_to_an_attention_that_takes_them():
    """A fresh prompt's attention from this step's rotated K/V rows, handed out by the
    RoPE + K/V kernel (new_k) instead of XLA's RoPE and scatters, as the flash path runs
    prefill on a GPU; later chunks read the pages the kernel wrote: numpy's logits."""
    calls = []

    def writer(*args, **kwargs):
        calls.append(kwargs.get("new_k", False))
        return rope_and_write_kv_interpret(*args, **kwargs)

    attention = functools.partial(fresh_from_rows)
    attention.takes_new_kv = True
    attention.rope_kv_writer = writer
    check_against_numpy("llama3-scaled-untied", (6, 1, 4), joined=True, layer_arrays=True,
                        attention=attention)
    assert calls == [True] * (3 * CONFIGS["llama3-scaled-untied"].num_layers)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_rope_kv_writer_on_quantized_pages_matches_the_models_ops(mode):
    """int8/fp8 pages (cache.kv_dtype): the kernel's RoPE, quantization and writes give the
    pages, scales and logits of the model's own ops, chunk by chunk."""
    c = CONFIGS["mistral-gqa8"]
    flat = split_layers(jax.tree.map(jnp.asarray, flatten_params(random_params(c, seed=3))),
                        c.num_layers)
    params = nest_params(fuse_gate_up(fuse_qkv(flat)))
    page_size, num_pages = 4, 6
    kv_shape = (c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim)
    storage = KV_STORAGE[mode]
    ids = np.random.default_rng(2).integers(0, c.vocab_size, 11).astype(np.int32)
    pages = np.array([3, 1, 5, 2], np.int32)
    calls = []

    def writer(*args, **kwargs):  # records that the kernel ran, with scales
        calls.append(kwargs.get("k_scales") is not None)
        return rope_and_write_kv_interpret(*args, **kwargs)

    with_writer = functools.partial(ragged_paged_attention_reference)
    with_writer.rope_kv_writer = writer
    runs = []
    for attention in (ragged_paged_attention_reference, with_writer):
        model = LlamaModel(c, jnp.float32, attention, layer_arrays=True, fused_qkv=True,
                           fused_gate_up=True)
        kv = (jnp.zeros(kv_shape, storage), jnp.zeros(kv_shape, storage),
              jnp.ones(kv_shape[:4], jnp.float32), jnp.ones(kv_shape[:4], jnp.float32))
        start, logits = 0, []
        for n in (4, 1, 6):
            meta = one_sequence(pages, start, n, page_size)
            out, kv = model.apply({"params": params}, jnp.asarray(ids[start:start + n]), kv,
                                  meta, jnp.arange(n, dtype=jnp.int32))
            logits.append(np.asarray(out))
            start += n
        runs.append((np.concatenate(logits), [np.asarray(a.astype(jnp.float32)) for a in kv]))
    (want_logits, want_kv), (got_logits, got_kv) = runs
    assert calls == [True] * (3 * c.num_layers)  # every layer of every chunk
    assert len(got_kv) == 4  # pages and scales came back from the kernel
    # layer 0's V: no RoPE before it, the same bytes; its scales the same, or (XLA's CPU
    # code for the kernel's absmax and the model's differs between processors) one ulp
    # apart: on an Intel Xeon with AVX-512, 1 of the 24 fp8 scales
    np.testing.assert_array_equal(got_kv[1][0], want_kv[1][0])
    np.testing.assert_array_max_ulp(got_kv[3][0], want_kv[3][0], maxulp=1)
    # the kernel's float32 RoPE differs from XLA's fusion in the last bit, and later layers
    # inherit that: scales within ulps, a rare entry one step off
    for values, scales in ((0, 2), (1, 3)):
        np.testing.assert_allclose(got_kv[scales], want_kv[scales], rtol=1e-5)
        step = want_kv[scales][..., None]
        assert np.mean(got_kv[values] != want_kv[values]) < 0.01
        np.testing.assert_allclose(got_kv[values] * step, want_kv[values] * step,
                                   atol=float(np.max(step)) * (1 if mode == "int8" else 32))
    pos = np.arange(len(ids))  # every written slot got its own scale
    assert np.all(want_kv[2][:, pages[pos // page_size], pos % page_size] != 1.0)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)


def test_fuse_qkv_joins_each_layers_weights_on_the_heads_axis():
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    flat = {"embedding": arr(5, 4)}
    for i in range(2):
        for name, n in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2)):
            flat[f"layers_{i}/attn/{name}/kernel"] = arr(6, n, 3)
            flat[f"layers_{i}/attn/{name}/kernel_scale"] = arr(n, 3)  # int8/fp8: [heads, hd]
        flat[f"layers_{i}/attn/o_proj"] = arr(4, 3, 6)
    want = {k: np.asarray(v) for k, v in flat.items()}
    out = fuse_qkv(dict(flat))
    assert sorted(out) == sorted(["embedding"] + [
        f"layers_{i}/attn/{k}" for i in range(2)
        for k in ("qkv_proj/kernel", "qkv_proj/kernel_scale", "o_proj")])
    for i in range(2):
        for leaf, axis in (("kernel", 1), ("kernel_scale", 0)):
            np.testing.assert_array_equal(out[f"layers_{i}/attn/qkv_proj/{leaf}"], np.concatenate(
                [want[f"layers_{i}/attn/{n}/{leaf}"] for n in ("q_proj", "k_proj", "v_proj")],
                axis=axis))
    np.testing.assert_array_equal(out["layers_1/attn/o_proj"], want["layers_1/attn/o_proj"])


@pytest.mark.parametrize("shards", [2, 4])
def test_fuse_qkv_joins_split_heads_shard_by_shard(shards):
    """Heads split over `shards` devices: each device's slice of the joined axis is its own q
    heads, then its k heads, then its v heads (the per-device model splits them so), and it
    holds exactly that slice; the join moves no head to another device (its compiled program
    has no collective)."""
    if jax.device_count() < shards:
        pytest.skip(f"needs {shards} devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:shards]), ("tensor",))
    spec = jax.sharding.PartitionSpec
    rng = np.random.default_rng(1)
    heads = {"q_proj": 8, "k_proj": 4, "v_proj": 4}
    want, flat = {}, {}
    for name, n in heads.items():
        for leaf, shape, split in (("kernel", (6, n, 3), spec(None, "tensor", None)),
                                   ("kernel_scale", (n, 3), spec("tensor", None))):
            want[name, leaf] = rng.normal(size=shape).astype(np.float32)
            flat[f"layers_0/attn/{name}/{leaf}"] = jax.device_put(
                want[name, leaf], jax.sharding.NamedSharding(mesh, split))
    parts = tuple(flat[f"layers_0/attn/{name}/kernel"] for name in heads)
    program = _join_heads(parts[0].sharding, 3, shards).lower(parts).compile().as_text()
    assert not re.search(r"all-gather|all-to-all|collective-permute|all-reduce", program)
    out = fuse_qkv(flat)
    for leaf, axis in (("kernel", 1), ("kernel_scale", 0)):
        joined = out[f"layers_0/attn/qkv_proj/{leaf}"]
        assert joined.sharding.spec == flat[f"layers_0/attn/q_proj/{leaf}"].sharding.spec
        by_device = {s.device: np.asarray(s.data) for s in joined.addressable_shards}
        for rank, device in enumerate(mesh.devices.flat):
            mine = [np.take(want[name, leaf], range(rank * n // shards, (rank + 1) * n // shards),
                            axis=axis) for name, n in heads.items()]
            np.testing.assert_array_equal(by_device[device], np.concatenate(mine, axis=axis))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs two devices")
def test_fuse_qkv_refuses_parts_split_in_different_numbers_of_shards():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor", None))
    flat = {"layers_3/attn/q_proj/kernel": jax.device_put(np.zeros((6, 4, 3), np.float32), split),
            "layers_3/attn/k_proj/kernel": jnp.zeros((6, 2, 3)),
            "layers_3/attn/v_proj/kernel": jnp.zeros((6, 2, 3))}
    with pytest.raises(ValueError, match=r"layers_3/attn: the heads of q_proj, k_proj, v_proj "
                                         r"are split in different numbers of shards \(\[1, 2\]\)"):
        fuse_qkv(flat)


def test_fuse_gate_up_stacks_each_layers_halves_before_the_mlp_axis():
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    flat = {"embedding": arr(5, 4)}
    for i in range(2):
        for name in ("gate_proj", "up_proj"):
            flat[f"layers_{i}/mlp/{name}"] = arr(4, 6)
            flat[f"layers_{i}/mlp/{name}_scale"] = arr(6)  # int8/fp8: one per output
        flat[f"layers_{i}/mlp/down_proj"] = arr(6, 4)
    flat["layers_0/moe/experts/gate_proj"] = arr(3, 4, 6)  # experts stay apart
    want = {k: np.asarray(v) for k, v in flat.items()}
    out = fuse_gate_up(dict(flat))
    assert sorted(out) == sorted(["embedding", "layers_0/moe/experts/gate_proj"] + [
        f"layers_{i}/mlp/{k}" for i in range(2)
        for k in ("gate_up_proj", "gate_up_proj_scale", "down_proj")])
    for i in range(2):
        for suffix, axis in (("", 1), ("_scale", 0)):
            np.testing.assert_array_equal(out[f"layers_{i}/mlp/gate_up_proj{suffix}"], np.stack(
                [want[f"layers_{i}/mlp/{n}{suffix}"] for n in ("gate_proj", "up_proj")],
                axis=axis))
    np.testing.assert_array_equal(out["layers_1/mlp/down_proj"], want["layers_1/mlp/down_proj"])


def check_against_numpy(name, chunks, kv_rotation=False, joined=False, layer_arrays=False,
                        attention=ragged_paged_attention_reference, layer_loop=False,
                        transposed=False):
    c = CONFIGS[name]
    params = random_params(c, seed=len(name))
    ids = np.random.default_rng(1).integers(0, c.vocab_size, sum(chunks)).astype(np.int32)
    want = np_forward(c, jax.tree.map(np.float64, params), ids)

    page_size, num_pages = (4 if sum(chunks) <= 16 else 16), 6
    kv_shape = (c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim)
    kv = (jnp.zeros(kv_shape), jnp.zeros(kv_shape))
    pages = np.array([3, 1, 5, 2], np.int32)  # scattered pages, none the null page
    model = LlamaModel(c, jnp.float32, attention,
                       kv_rotation=kv_rotation, layer_arrays=layer_arrays, fused_qkv=joined,
                       fused_gate_up=joined, layer_loop=layer_loop, transposed=transposed)
    if layer_arrays or joined:
        flat = jax.tree.map(jnp.asarray, flatten_params(params))
        if layer_arrays:
            flat = split_layers(flat, c.num_layers)
        if joined:
            flat = fuse_gate_up(fuse_qkv(flat))
        params = nest_params(transpose_weights(flat) if transposed else flat)
    if joined and not transposed:
        layer = params["layers_0" if layer_arrays else "layers"]
        assert "q_proj" not in layer["attn"] and "gate_proj" not in layer["mlp"]
        assert layer["attn"]["qkv_proj"]["kernel"].shape[-3:] == (
            c.hidden_size, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        assert layer["mlp"]["gate_up_proj"].shape[-3:] == (c.hidden_size, 2, c.intermediate_size)
    start = 0
    for n in chunks:  # feed the sequence chunk by chunk; logits of every chunk's tokens
        meta = one_sequence(pages, start, n, page_size)
        logits, kv = model.apply({"params": params}, jnp.asarray(ids[start:start + n]), kv,
                                 meta, jnp.arange(n, dtype=jnp.int32))
        np.testing.assert_allclose(np.asarray(logits), want[start:start + n],
                                   rtol=2e-4, atol=2e-4)
        start += n


def test_rope_scaling_llama31_shape():
    """Llama 3.1's real settings: high frequencies untouched, low ones divided by 8."""
    from jaxserve.models.rope import inverse_frequencies

    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    c = ModelConfig("llama", 10, 8, 8, 1, 1, 1, 128, rope_theta=500000.0, rope_scaling=scaling)
    scaled = inverse_frequencies(128, 500000.0, scaling)
    plain = inverse_frequencies(128, 500000.0, None)
    np.testing.assert_allclose(scaled, np_inv_freq(c), rtol=1e-6)
    assert scaled[0] == plain[0]
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)
    assert np.all(scaled <= plain)
