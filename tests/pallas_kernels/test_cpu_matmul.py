"""The CPU matmul kernel (pallas_kernels/cpu_matmul.py) against a float64 product, inside the
control flow the model runs it in, its refusals, its build, and the model's use of it for
the rows it takes. Skipped where the kernel cannot run (no AVX-512, no C++ compiler)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cpu_kernel_marks import needs_cpu_kernels

from jaxserve.config import Config, RunnerSection
from jaxserve.engine import runner
from jaxserve.errors import ConfigError
from jaxserve.models.layer_select import LayerSelect
from jaxserve.models.transposed import Transposed, transposed_einsum
from pallas_kernels import cpu_build
from pallas_kernels import cpu_matmul as kernel
from pallas_kernels.cpu_matmul import MAX_ROWS, available, cpu_matmul

pytestmark = needs_cpu_kernels


def test_it_is_built_and_registered():
    assert available()


def operands(m: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((n, k)).astype(np.float32))


def assert_product(got, x, w):
    """got within float32 rounding of x . w^T: a sum of k float32 terms in any order is
    within k * 2^-24 * sum |terms| of the exact one; a wrong index or row is off by the terms."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    exact = x64 @ w64.T
    bound = x.shape[1] * 2.0**-24 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    assert got.shape == exact.shape and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / bound)


# N below one block of 8 rows, not a multiple of it, and large enough for every thread's share
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("n, k", [(1, 8), (7, 33), (64, 576), (1003, 1536), (13, 1)])
def test_matches_the_float64_product(m, n, k):
    x, w = operands(m, n, k, seed=m * 1000 + n)
    got = np.asarray(jax.jit(cpu_matmul)(jnp.asarray(x), jnp.asarray(w)))
    assert_product(got, x, w)


def test_inside_a_loop_and_a_switch():
    """The layer loop's form: a fori_loop whose matmul picks its layer's weight by switch."""
    x, _ = operands(16, 1, 64, seed=1)
    weights = [operands(1, 64, 64, seed=10 + i)[1] for i in range(3)]

    def layers(ws, h):
        def body(i, h):
            return jax.lax.switch(i, [lambda h, w=w: cpu_matmul(h, w) * 0.125 for w in ws], h)
        return jax.lax.fori_loop(0, len(ws), body, h)

    got = np.asarray(jax.jit(layers)([jnp.asarray(w) for w in weights], jnp.asarray(x)))
    want = x.astype(np.float64)
    for w in weights:
        want = want @ w.astype(np.float64).T * 0.125
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, dtype, words", [
    ((17, 8), (4, 8), jnp.float32, "17 rows"),
    ((0, 8), (4, 8), jnp.float32, "0 rows"),
    ((2, 8), (4, 9), jnp.float32, r"w \[N, K\] expected"),
    ((2, 8, 1), (4, 8), jnp.float32, r"w \[N, K\] expected"),
    ((2, 8), (4, 8), jnp.bfloat16, "float32 operands"),
])
def test_refuses_what_it_cannot_take(x_shape, w_shape, dtype, words):
    with pytest.raises(ValueError, match=words):
        cpu_matmul(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype))


def test_builds_into_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    library = cpu_build.build("cpu_matmul")
    assert library.parent == tmp_path / "kernels" and library.exists()
    assert cpu_build.build("cpu_matmul") == library  # found, not built again
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [library.name]


def test_a_missing_compiler_fails_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        cpu_build.build("cpu_matmul")
    assert list((tmp_path / "kernels").iterdir()) == []  # no partial library left behind


def test_a_kernel_that_cannot_be_registered_is_refused_before_its_call(capsys):
    with pytest.raises(RuntimeError, match="CPU kernel no_such_kernel cannot run"):
        cpu_build.require("no_such_kernel")
    assert "the CPU kernel no_such_kernel is off" in capsys.readouterr().err


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17])
def test_the_model_takes_it_for_1_to_16_rows(m):
    """transposed_einsum with cpu_kernel: the kernel for 1-16 float32 rows, XLA's dot above
    16; the same products either way, a layer loop's LayerSelect weight included."""
    x, w = operands(m, 24, 48, seed=m)
    w3 = jnp.asarray(w).reshape(2, 12, 48)  # [outputs..., inputs]: two output axes
    xs = jnp.asarray(x)
    for weight in (w3, LayerSelect((w3, w3 * 2), jnp.int32(1))):
        on = lambda xs, weight: transposed_einsum("TE,EGF->TGF", xs,
                                                  Transposed(weight, 1, cpu_kernel=True))
        off = lambda xs, weight: transposed_einsum("TE,EGF->TGF", xs, Transposed(weight, 1))
        assert (kernel.TARGET in hlo(on, xs, weight)) == (m <= MAX_ROWS)
        assert kernel.TARGET not in hlo(off, xs, weight)
        np.testing.assert_allclose(np.asarray(jax.jit(on)(xs, weight)),
                                   np.asarray(jax.jit(off)(xs, weight)), rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_with_xla():
    x, w = operands(4, 16, 32, seed=3)
    f = lambda x, w: transposed_einsum("TE,EF->TF", x, Transposed(w, 1, cpu_kernel=True))
    assert kernel.TARGET not in hlo(f, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))


def test_the_runner_resolves_the_setting(monkeypatch):
    def config(**runner_keys):
        return Config(runner=RunnerSection(layer_arrays=True, transposed_weights=True,
                                           **runner_keys))

    assert runner.use_cpu_kernels(config()) is True  # null: on where they run
    assert runner.use_cpu_kernels(config(cpu_kernels=False)) is False
    monkeypatch.setattr(runner, "cpu_matmul_available", lambda: False)
    assert runner.use_cpu_kernels(config()) is False
    with pytest.raises(ConfigError, match="runner.cpu_kernels: true needs"):
        runner.use_cpu_kernels(config(cpu_kernels=True))
