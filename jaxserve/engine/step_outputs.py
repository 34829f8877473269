"""A step's sampler output: packed into one int32 array inside the step, read as numpy views.

The sampler gives five arrays per step (tokens, their logprobs, the top ids and logprobs,
the accepted proposals). Read back one by one, each costs a device-to-host transfer, every
step. So the step packs them into one int32 row per sequence, float32 values as their bits:

    [ tokens (J) | logprobs (J) | top_ids (J * N) | top_logprobs (J * N) | num_accepted (1) ]

and the host unpacks the row as views of the one array it fetched (`unpack`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.sampling import SamplerOutput


def width(rows: int, num_top: int) -> int:
    """int32 values per sequence for `rows` sampled rows (J) with `num_top` logprobs (N)."""
    return rows * (2 + 2 * num_top) + 1


def pack(out: SamplerOutput) -> jax.Array:
    """SamplerOutput [S, J, ...] with num_accepted [S] -> int32 [S, width(J, N)]."""
    S, J = out.tokens.shape
    bits = lambda a: jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    return jnp.concatenate([
        out.tokens.astype(jnp.int32), bits(out.logprobs),
        out.top_ids.astype(jnp.int32).reshape(S, -1), bits(out.top_logprobs).reshape(S, -1),
        out.num_accepted.astype(jnp.int32)[:, None]], axis=1)


def unpack(packed: np.ndarray, rows: int, num_top: int) -> SamplerOutput:
    """int32 [..., S, width(J, N)] on the host -> SamplerOutput of numpy views
    ([..., S, J], [..., S, J], [..., S, J, N], [..., S, J, N]; num_accepted [..., S])."""
    J, N = rows, num_top
    lead = packed.shape[:-1]
    if packed.shape[-1] != width(J, N):
        raise ValueError(f"packed output has {packed.shape[-1]} values per sequence, "
                         f"expected {width(J, N)} for {J} rows and {N} top logprobs")
    cuts = np.cumsum([0, J, J, J * N, J * N, 1])
    part = lambda i: packed[..., cuts[i]:cuts[i + 1]]
    return SamplerOutput(
        tokens=part(0), logprobs=part(1).view(np.float32),
        top_ids=part(2).reshape(*lead, J, N),
        top_logprobs=part(3).view(np.float32).reshape(*lead, J, N),
        num_accepted=part(4)[..., 0])
