"""The MLP's gate/up + SwiGLU kernel hook (`mlp_forward(..., swiglu=)`, runner.pick_swiglu):
which programs take it, and that a model with it gives the logits of one without."""

import jax
import jax.numpy as jnp
import numpy as np
from paged_steps import one_sequence
from random_models import random_params

from jaxserve.config import Config
from jaxserve.engine.runner import SWIGLU_MIN_TOKENS, pick_swiglu
from jaxserve.models.llama import (
    LlamaModel,
    flatten_params,
    fuse_gate_up,
    fuse_qkv,
    mlp_forward,
    nest_params,
    split_layers,
)
from jaxserve.models.model_config import ModelConfig
from pallas_kernels.paged_attention import ragged_paged_attention_reference
from pallas_kernels.swiglu_matmul_mgpu import PrefillSwiglu, Tiles

SMALL = Tiles(rows=64, cols=64, depth=64, stages=2, snake=2)


def _mlp_weights(e, f, seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.normal(0, 1 / np.sqrt(s[0]), s), jnp.bfloat16)  # noqa: E731
    return {"gate_up": w(e, 2, f), "down": w(f, e)}


def test_mlp_takes_the_kernel_from_min_tokens_and_xla_below():
    e, f = 128, 256
    weights = _mlp_weights(e, f)
    kernel = PrefillSwiglu(min_tokens=128, tiles=SMALL, programs=2, interpret=True)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((128, e)), jnp.bfloat16)
    with_kernel = np.asarray(mlp_forward(x, **weights, swiglu=kernel), np.float32)
    plain = np.asarray(mlp_forward(x, **weights), np.float32)
    np.testing.assert_allclose(with_kernel, plain, rtol=0.05, atol=0.05 * np.abs(plain).max())
    assert kernel(x, weights["gate_up"]) is not None
    # below min_tokens, a float32 x, or rows the tiles do not divide: XLA's product
    assert kernel(x[:64], weights["gate_up"]) is None
    assert kernel(x.astype(jnp.float32), weights["gate_up"]) is None
    assert PrefillSwiglu(min_tokens=64, tiles=Tiles(rows=128)).__call__(
        x[:64], weights["gate_up"]) is None
    np.testing.assert_array_equal(np.asarray(mlp_forward(x[:64], **weights, swiglu=kernel)),
                                  np.asarray(mlp_forward(x[:64], **weights)))


def _tiny_model(swiglu):
    c = ModelConfig("llama", vocab_size=97, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    flat = jax.tree.map(jnp.asarray, flatten_params(random_params(c, seed=3)))
    flat = fuse_gate_up(fuse_qkv(split_layers(flat, c.num_layers)))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nest_params(flat))
    model = LlamaModel(c, jnp.bfloat16, ragged_paged_attention_reference, layer_arrays=True,
                       fused_qkv=True, fused_gate_up=True, swiglu=swiglu)
    return c, params, model


def _logits(c, params, model, n):
    ids = np.random.default_rng(2).integers(0, c.vocab_size, n).astype(np.int32)
    kv_shape = (c.num_layers, 6, 16, c.num_kv_heads, c.head_dim)
    kv = (jnp.zeros(kv_shape, jnp.bfloat16), jnp.zeros(kv_shape, jnp.bfloat16))
    meta = one_sequence(np.array([3, 1, 5, 2, 4], np.int32), 0, n, 16)
    logits, _ = model.apply({"params": params}, jnp.asarray(ids), kv, meta,
                            jnp.arange(n, dtype=jnp.int32))
    return np.asarray(logits, np.float32)


def test_every_layer_hands_its_gate_up_to_the_hook():
    seen = []

    def spy(x, gate_up):
        seen.append((x.shape, gate_up.shape))
        return None  # XLA's product after all

    c, params, model = _tiny_model(spy)
    _logits(c, params, model, 64)
    assert seen == [((64, 64), (64, 2, 128))] * c.num_layers


def test_a_model_with_the_kernel_gives_the_logits_of_one_without():
    kernel = PrefillSwiglu(min_tokens=64, tiles=SMALL, programs=2, interpret=True)
    c, params, with_kernel = _tiny_model(kernel)
    _, _, plain = _tiny_model(None)
    got, want = _logits(c, params, with_kernel, 64), _logits(c, params, plain, 64)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_pick_swiglu_leaves_cpu_and_other_backends_to_xla():
    config = Config()
    assert SWIGLU_MIN_TOKENS >= 512
    assert pick_swiglu(config, jnp.bfloat16, 128, layer_arrays=True) is None  # a CPU
    reference = config.replace(runner__attention_backend="reference")
    assert pick_swiglu(reference, jnp.bfloat16, 128, layer_arrays=True) is None
