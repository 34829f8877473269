"""The MLP's first product with SwiGLU in its epilogue, on Pallas Mosaic GPU (Hopper: wgmma,
TMA, warp specialisation): h = silu(x Wg) * (x Wu), written once.

XLA computes x [T, E] . gate_up [E, 2, F] as one GEMM whose [T, 2, F] result goes to memory,
then a fusion reads it back and writes h [T, F]. In a prefill step of 2048 tokens of the
Llama-3-8B shape that fusion moves 176 MB a layer (docs/performance.md). Here each consumer
accumulates the gate's and the up's columns of the same outputs in two register tiles, and
its epilogue multiplies them before the single store of h. The weight is the engine's
gate_up as it lies ([E, 2, F], read as [E, 2F]).

Kernel. A persistent grid of one program per SM walks the output tiles in a snake order
that keeps neighbouring programs on the same rows of x and columns of W (L2 reuse). Each
program runs three warpgroups: a producer streams tiles of x, of the gate's and of the up's
columns with TMA into a ring of `stages` slots, and two consumers each own `cols` columns
of h over `rows` rows, accumulating with wgmma. The ring is emitted by
`plgpu.emit_pipeline_warp_specialized`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention_mgpu import _transforms

LOG2_E = 1.4426950408889634
CONSUMERS = 2


@dataclasses.dataclass(frozen=True)
class Tiles:
    """rows x cols: a consumer's tile of h (two float32 accumulators, gate and up, in its
    registers); depth: the K step; stages: the TMA ring; snake: tiles per band of the walk."""

    rows: int = 128
    cols: int = 64
    depth: int = 64
    stages: int = 3
    snake: int = 8

    def unfit(self, m: int, f: int, k: int) -> str | None:
        """Why these tiles cannot cover x [m, k] . gate_up [k, 2, f], or None."""
        if self.cols % 64 or self.rows % 64 or self.depth % 64:
            return (f"Tiles rows={self.rows}, cols={self.cols}, depth={self.depth} must be "
                    "multiples of 64")
        if m % self.rows:
            return f"x has {m} rows, not a multiple of Tiles.rows={self.rows}"
        if f % (CONSUMERS * self.cols):
            return (f"gate_up has F={f} columns, not a multiple of {CONSUMERS * self.cols} "
                    f"(two consumers of {self.cols})")
        if k % self.depth:
            return f"K={k} is not a multiple of Tiles.depth={self.depth}"
        return None


def reference(x, gate_up):
    """h = silu(x Wg) * (x Wu) in float32, then x's dtype."""
    both = jnp.einsum("TE,EGF->TGF", x, gate_up, preferred_element_type=jnp.float32)
    return (jax.nn.silu(both[:, 0]) * both[:, 1]).astype(x.dtype)


def _kernel(x_gmem, w_gmem, out_gmem, *, t: Tiles):
    m, k = x_gmem.shape
    f = w_gmem.shape[1] // 2
    band = CONSUMERS * t.cols  # columns of h (of gate, of up) in one program's tile
    m_tiles, n_tiles, k_steps = m // t.rows, f // band, k // t.depth
    in_transforms = _transforms(t.depth, x_gmem.dtype)
    w_spec = plgpu.BlockSpec((t.depth, band), lambda kk: (kk, 0), transforms=in_transforms,
                             memory_space=plgpu.SMEM)

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((t.rows, t.depth), lambda kk: (0, kk),
                                      transforms=in_transforms, memory_space=plgpu.SMEM),
                      w_spec, w_spec],
            wg_axis="wg", num_compute_wgs=CONSUMERS, max_concurrent_steps=t.stages,
            compute_context=context)

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(unused, unused).get_allocations(
            x_gmem, w_gmem.at[:, pl.ds(0, band)], w_gmem.at[:, pl.ds(f, band)]),
        out_smem=plgpu.SMEM((CONSUMERS, t.rows, t.cols), out_gmem.dtype,
                            transforms=_transforms(t.cols, out_gmem.dtype)),
        collective_axes="wg")
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")
        mine = pl.ds(wg * t.cols, t.cols)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            (i,) = info.index
            mi, ni = plgpu.planar_snake(i, (m_tiles, n_tiles), 1, t.snake)
            rows = pl.ds(mi * t.rows, t.rows)

            def context(run):
                @functools.partial(pl.run_scoped,
                                   acc_g=plgpu.ACC((t.rows, t.cols), jnp.float32),
                                   acc_u=plgpu.ACC((t.rows, t.cols), jnp.float32))
                def _acc(acc_g, acc_u):
                    run((acc_g, acc_u))
                    gate, up = acc_g[...], acc_u[...]
                    h = gate / (1.0 + jnp.exp2(gate * -LOG2_E)) * up
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = h.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg],
                        out_gmem.at[rows, pl.ds(ni * band + wg * t.cols, t.cols)])

            def mma(_, x_smem, g_smem, u_smem, accs):
                acc_g, acc_u = accs
                plgpu.wgmma(acc_g, x_smem, g_smem.at[:, mine])
                plgpu.wgmma(acc_u, x_smem, u_smem.at[:, mine])
                plgpu.wgmma_wait(0)
                return accs

            pipeline(mma, context)(x_gmem.at[rows, :],
                                   w_gmem.at[:, pl.ds(ni * band, band)],
                                   w_gmem.at[:, pl.ds(f + ni * band, band)],
                                   allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("tiles", "programs", "interpret"))
def swiglu_matmul(x, gate_up, tiles: Tiles = Tiles(), programs: int | None = None,
                  interpret: bool = False):
    """h [T, F] = silu(x Wg) * (x Wu) for x [T, E] and gate_up [E, 2, F] (gate, up);
    bfloat16 or float16, T a multiple of tiles.rows. programs: the persistent grid (default:
    one per SM); interpret: Mosaic GPU's interpreter (CPU)."""
    m, k = x.shape
    if gate_up.ndim != 3 or gate_up.shape[:2] != (k, 2) or x.dtype != gate_up.dtype:
        raise ValueError(f"x {x.shape} {x.dtype} and gate_up {gate_up.shape} {gate_up.dtype}: "
                         f"want gate_up [{k}, 2, F] of x's dtype")
    f = gate_up.shape[2]
    if reason := tiles.unfit(m, f, k):
        raise ValueError(reason)
    if programs is None:
        programs = jax.devices()[0].core_count
    call = plgpu.kernel(
        functools.partial(_kernel, t=tiles),
        out_type=jax.ShapeDtypeStruct((m, f), x.dtype),
        grid=(programs,), grid_names=("sm",), num_threads=CONSUMERS + 1, thread_name="wg",
        compiler_params=None if interpret else plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    return call(x, gate_up.reshape(k, 2 * f))


@dataclasses.dataclass(frozen=True)
class PrefillSwiglu:
    """The model's MLP hook (models/llama.py, `mlp_forward`): h from this kernel for programs
    of at least `min_tokens` tokens whose shapes `tiles` divide, with gate_up a plain
    bfloat16 / float16 array of x's dtype; None otherwise (XLA's product then)."""

    min_tokens: int
    tiles: Tiles = Tiles()
    programs: int | None = None
    interpret: bool = False

    def __call__(self, x, gate_up):
        t, e = x.shape
        if not isinstance(gate_up, jax.Array) or gate_up.ndim != 3 or t < self.min_tokens:
            return None
        if x.dtype != gate_up.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
            return None
        if self.tiles.unfit(t, gate_up.shape[2], e):
            return None
        return swiglu_matmul(x, gate_up, self.tiles, self.programs, self.interpret)
