"""Tensor parallelism: what one device of the `tensor` axis holds, and KV-head replication.

Megatron layout: each of the `tp` devices holds num_heads / tp query heads (q_proj columns,
o_proj rows), intermediate / tp MLP columns (gate/up) and rows (down), and vocab / tp rows
of the embedding and LM head. The model runs under `jax.shard_map` with these per-device
shapes and adds one all-reduce after o_proj and one after down_proj.

KV heads: with kv_heads >= tp each device holds kv_heads / tp of them. With fewer KV heads
than devices (tp % kv_heads == 0), each KV head is replicated on tp / kv_heads devices, so
every device still holds exactly one KV head: the served model has `tp` KV heads, KV head j
of the checkpoint repeated `kv_replicas` times. A device's query heads all read its one KV
head, because num_heads / tp divides num_heads / kv_heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sharding import rules


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    tp: int
    heads: int  # query heads per device
    kv_heads: int  # KV heads per device
    kv_replicas: int  # devices holding each checkpoint KV head (1: no replication)
    mlp: int  # intermediate columns per device
    vocab: int  # vocabulary rows per device
    moe_mlp: int = 0  # columns of each expert per device (MoE models)

    @property
    def served_kv_heads(self) -> int:
        """KV heads of the model as served: the checkpoint's, each repeated kv_replicas times."""
        return self.kv_heads * self.tp

    @classmethod
    def for_model(cls, model_config, tp: int) -> TensorPlan:
        """The plan for a ModelConfig (anything with its head, MLP and vocabulary sizes)."""
        c = model_config
        return cls.make(tp=tp, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                        intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                        moe_intermediate_size=getattr(c, "moe_intermediate_size", 0))

    def per_device(self, model_config):
        """The ModelConfig with one device's shapes: what the model is built from."""
        return dataclasses.replace(model_config, num_heads=self.heads,
                                   num_kv_heads=self.kv_heads, intermediate_size=self.mlp,
                                   vocab_size=self.vocab, moe_intermediate_size=self.moe_mlp)

    @classmethod
    def make(cls, *, tp: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
             vocab_size: int, moe_intermediate_size: int = 0) -> TensorPlan:
        """The plan for `tp` devices; ValueError naming both numbers when it cannot work."""
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise ValueError(f"mesh.tensor={tp}: {why}")

        need(num_heads % tp == 0, f"num_heads={num_heads} is not divisible by tensor={tp}")
        if num_kv_heads >= tp:
            need(num_kv_heads % tp == 0,
                 f"num_kv_heads={num_kv_heads} is not divisible by tensor={tp}")
            kv_heads, replicas = num_kv_heads // tp, 1
        else:
            need(tp % num_kv_heads == 0,
                 f"num_kv_heads={num_kv_heads} is fewer than tensor={tp} and does not divide "
                 "it, so KV heads cannot be replicated evenly")
            kv_heads, replicas = 1, tp // num_kv_heads
        need(intermediate_size % tp == 0,
             f"intermediate_size={intermediate_size} is not divisible by tensor={tp}")
        need(vocab_size % tp == 0, f"vocab_size={vocab_size} is not divisible by tensor={tp}")
        need(moe_intermediate_size % tp == 0, f"moe_intermediate_size={moe_intermediate_size} "
             f"is not divisible by tensor={tp}")
        return cls(tp, num_heads // tp, kv_heads, replicas, intermediate_size // tp,
                   vocab_size // tp, moe_intermediate_size // tp)


def replicate_kv_heads(params: dict, specs: dict, plan: TensorPlan, mesh: Mesh) -> dict:
    """Repeat each KV head of the k/v projections `kv_replicas` times, then shard over tensor.

    params: flat {path: array}; specs: {path: (shape, logical names)} of the checkpoint.
    Arrays without a `kv_heads` axis pass through untouched.
    """
    if plan.kv_replicas == 1:
        return params
    out = dict(params)
    for path, (shape, names) in specs.items():
        if "kv_heads" not in names:
            continue
        axis = names.index("kv_heads")
        served = (*shape[:axis], shape[axis] * plan.kv_replicas, *shape[axis + 1:])
        sharding = rules.sharding_for(names, served, mesh)
        repeat = jax.jit(lambda x, a=axis: jnp.repeat(x, plan.kv_replicas, axis=a),
                         out_shardings=sharding)
        out[path] = repeat(params[path])
    return out
