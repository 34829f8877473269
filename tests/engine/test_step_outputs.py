"""The packed sampler output: what the step packs, the host reads back unchanged."""

import jax
import numpy as np
import pytest

from jaxserve.engine import step_outputs
from jaxserve.engine.sampling import SamplerOutput


@pytest.mark.parametrize("rows,num_top", [(1, 20), (3, 5), (1, 0)])
def test_unpack_gives_back_what_pack_took(rows, num_top):
    rng = np.random.default_rng(rows * 31 + num_top)
    S = 6
    out = SamplerOutput(
        tokens=rng.integers(0, 128256, (S, rows)).astype(np.int32),
        logprobs=-rng.random((S, rows), np.float32) * 30,
        top_ids=rng.integers(0, 128256, (S, rows, num_top)).astype(np.int32),
        top_logprobs=-rng.random((S, rows, num_top), np.float32) * 30,
        num_accepted=rng.integers(0, rows, S).astype(np.int32))
    out.logprobs[0, 0] = -np.inf  # special values keep their bits
    packed = np.asarray(jax.jit(step_outputs.pack)(out))
    assert packed.dtype == np.int32
    assert packed.shape == (S, step_outputs.width(rows, num_top))
    # a leading [D] axis, as the runner fetches it
    back = step_outputs.unpack(np.stack([packed, packed]), rows, num_top)
    for name in ("tokens", "logprobs", "top_ids", "top_logprobs", "num_accepted"):
        got, want = getattr(back, name), getattr(out, name)
        assert got.shape == (2, *want.shape), name
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got[1], want, err_msg=name)


def test_unpack_refuses_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match="expected 43 for 1 rows and 20 top logprobs"):
        step_outputs.unpack(np.zeros((4, 42), np.int32), 1, 20)
