"""Pallas TPU (Mosaic) flash attention with SAM's decomposed relative-position bias.

`relpos_attention_pallas` pads the tokens to whole tiles, reverses and pads the two tables, and runs
three kernels (`relpos_pallas_kernels`) under a `jax.custom_vjp`: the forward (saves the logsumexp),
a dK/dV kernel and a dQ kernel that also returns the gradients of both tables. Memory is O(N * d)
per head: nothing N x N exists in HBM, in either direction.

`interpret=True` runs the same kernels with the Pallas interpreter (CPU tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsvl_jax.ops import relpos_pallas_kernels as kernels
from dsvl_jax.ops.reference import check_relpos_inputs

# Tuned for SAM-B's global blocks (4,096 tokens, head_dim 64): 8 x 8 tiles per head, a 512 x 512
# float32 logits tile (1 MiB) and its backward siblings stay well inside the scoped VMEM.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
_LANES = 128


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static shapes of one call; hashable so that it can be a custom_vjp non-diff argument."""

    grid: tuple[int, int]
    n: int  # real tokens
    n_pad: int  # tokens after padding to whole tiles
    block_q: int
    block_k: int
    lanes_h: int  # table rows after padding (>= 2H-1, multiple of 128)
    lanes_w: int
    lanes_x: int  # width of the packed bias rows x (see relpos_pallas_kernels)
    interpret: bool
    st: kernels.KernelStatics


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def tile_sizes(n: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(bq, bk, n_pad) for n tokens: n_pad = n rounded up to 128, each tile the largest multiple of 128
    that divides n_pad and fits its block (TPU lane tiling of the per-query and per-key rows)."""
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block <= 0 or block % _LANES:
            raise ValueError(f"{name}={block}: must be a positive multiple of {_LANES} (TPU lane tiling)")
    n_pad = _round_up(n, _LANES)

    def fit(block):
        return max(b for b in range(_LANES, min(block, n_pad) + 1, _LANES) if n_pad % b == 0)

    return fit(block_q), fit(block_k), n_pad


def _coordinates(layout: _Layout):
    """Per-query rotation shifts [n_pad, 1] and per-key lanes of x [1, n_pad] (-1: padding).

    Key j selects lane kh(j) (its h row) and lane w_offset + kw(j) (its w column) of the bias rows x.
    """
    H, W = layout.grid
    idx = np.arange(layout.n_pad)
    real = idx < layout.n
    qh, qw = idx // W, idx % W
    shift_h = np.where(real, H - 1 - qh, 0).astype(np.int32)[:, None]
    shift_w = np.where(real, W - 1 - qw, 0).astype(np.int32)[:, None]
    key_h = np.where(real, qh, -1).astype(np.int32)[None, :]
    key_w = np.where(real, layout.st.w_offset + qw, -1).astype(np.int32)[None, :]
    return tuple(jnp.asarray(a) for a in (shift_h, shift_w, key_h, key_w))


def _common_specs(layout: _Layout, head_dim: int, q_tile, k_tile):
    """BlockSpecs of (shift_h, shift_w, key_h, key_w, q, k, v, rrev_h, rrev_w).

    q_tile / k_tile map grid indices (b, a, c) to the query / key tile index, so the same specs serve
    the (head, q, k)-ordered kernels and the (head, k, q)-ordered one.
    """
    bq, bk, d = layout.block_q, layout.block_k, head_dim
    return [
        pl.BlockSpec((bq, 1), lambda b, a, c: (q_tile(a, c), 0)),
        pl.BlockSpec((bq, 1), lambda b, a, c: (q_tile(a, c), 0)),
        pl.BlockSpec((1, bk), lambda b, a, c: (0, k_tile(a, c))),
        pl.BlockSpec((1, bk), lambda b, a, c: (0, k_tile(a, c))),
        pl.BlockSpec((None, bq, d), lambda b, a, c: (b, q_tile(a, c), 0)),
        pl.BlockSpec((None, bk, d), lambda b, a, c: (b, k_tile(a, c), 0)),
        pl.BlockSpec((None, bk, d), lambda b, a, c: (b, k_tile(a, c), 0)),
        pl.BlockSpec((layout.lanes_h, d), lambda b, a, c: (0, 0)),
        pl.BlockSpec((layout.lanes_w, d), lambda b, a, c: (0, 0)),
    ]


def _q_first(a, c):
    return a


def _q_second(a, c):
    return c


def _row_spec(layout, width, q_tile):
    return pl.BlockSpec((None, layout.block_q, width), lambda b, a, c: (b, q_tile(a, c), 0))


def _stat_spec(layout, q_tile):
    """Per-query float32 statistics (logsumexp, rowsum(dO * O)), lane-dense: [bh, 1, n_pad]."""
    return pl.BlockSpec((None, 1, layout.block_q), lambda b, a, c: (b, 0, q_tile(a, c)))


def _cost(layout, bh, d, matmuls, itemsize):
    """Rough flop / byte counts so that XLA schedules around the kernel sensibly."""
    n = layout.n_pad
    rel = 2 * layout.lanes_x  # the hi/lo bias expansion per logit
    flops = bh * n * n * (2 * d * matmuls + rel)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(bh * n * n),
                           bytes_accessed=int(bh * n * d * itemsize * (matmuls + 2)))


def _forward(q, k, v, rrev_h, rrev_w, layout: _Layout):
    bh, n_pad, d = q.shape
    nq, nk = n_pad // layout.block_q, n_pad // layout.block_k
    bq = layout.block_q
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(kernels.forward_kernel, st=layout.st),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bh, 1, n_pad), f32)),
        grid=(bh, nq, nk),
        in_specs=_common_specs(layout, d, _q_first, _q_second),
        out_specs=(_row_spec(layout, d, _q_first), _stat_spec(layout, _q_first)),
        scratch_shapes=[pltpu.VMEM((bq, layout.lanes_x), f32), pltpu.VMEM((bq, 1), f32),
                        pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, d), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(layout, bh, d, 2, q.dtype.itemsize),
        interpret=layout.interpret,
        name="relpos_flash_fwd",
    )(*_coordinates(layout), q, k, v, rrev_h, rrev_w)


def _backward(q, k, v, rrev_h, rrev_w, o, lse, do, layout: _Layout):
    bh, n_pad, d = q.shape
    nq, nk = n_pad // layout.block_q, n_pad // layout.block_k
    bq, bk = layout.block_q, layout.block_k
    f32 = jnp.float32
    # rowsum(dO * O): the softmax-Jacobian term of flash-attention-2, O(N) per head.
    di = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)[:, None, :]
    coords = _coordinates(layout)

    # dK, dV: key tiles outer, query tiles inner (grid indices b, key tile, query tile).
    dk, dv = pl.pallas_call(
        functools.partial(kernels.dkv_kernel, st=layout.st),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(bh, nk, nq),
        in_specs=_common_specs(layout, d, _q_second, _q_first)
        + [_row_spec(layout, d, _q_second), _stat_spec(layout, _q_second), _stat_spec(layout, _q_second)],
        out_specs=(pl.BlockSpec((None, bk, d), lambda b, a, c: (b, a, 0)),
                   pl.BlockSpec((None, bk, d), lambda b, a, c: (b, a, 0))),
        scratch_shapes=[pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, d), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(layout, bh, d, 4, q.dtype.itemsize),
        interpret=layout.interpret,
        name="relpos_flash_dkv",
    )(*coords, q, k, v, rrev_h, rrev_w, do, lse, di)

    # dQ and the tables: query tiles outer, key tiles inner. The table blocks stay resident per head.
    dq, drh, drw = pl.pallas_call(
        functools.partial(kernels.dq_kernel, st=layout.st),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((bh, layout.lanes_h, d), f32),
                   jax.ShapeDtypeStruct((bh, layout.lanes_w, d), f32)),
        grid=(bh, nq, nk),
        in_specs=_common_specs(layout, d, _q_first, _q_second)
        + [_row_spec(layout, d, _q_first), _stat_spec(layout, _q_first), _stat_spec(layout, _q_first)],
        out_specs=(_row_spec(layout, d, _q_first),
                   pl.BlockSpec((None, layout.lanes_h, d), lambda b, a, c: (b, 0, 0)),
                   pl.BlockSpec((None, layout.lanes_w, d), lambda b, a, c: (b, 0, 0))),
        scratch_shapes=[pltpu.VMEM((bq, layout.lanes_x), f32), pltpu.VMEM((bq, d), f32),
                        pltpu.VMEM((bq, layout.lanes_x), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost(layout, bh, d, 3, q.dtype.itemsize),
        interpret=layout.interpret,
        name="relpos_flash_dq",
    )(*coords, q, k, v, rrev_h, rrev_w, do, lse, di)
    return dq, dk, dv, drh.sum(0), drw.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, rrev_h, rrev_w, layout):
    return _forward(q, k, v, rrev_h, rrev_w, layout)[0]


def _flash_fwd(q, k, v, rrev_h, rrev_w, layout):
    o, lse = _forward(q, k, v, rrev_h, rrev_w, layout)
    return o, (q, k, v, rrev_h, rrev_w, o, lse)


def _flash_bwd(layout, residuals, do):
    q, k, v, rrev_h, rrev_w, o, lse = residuals
    dq, dk, dv, drh, drw = _backward(q, k, v, rrev_h, rrev_w, o, lse, do, layout)
    return dq, dk, dv, drh.astype(rrev_h.dtype), drw.astype(rrev_w.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _reversed_table(table, lanes, dtype):
    """Row u of the result holds table[len-1-u]; zero rows pad it to `lanes` (a whole lane tile)."""
    rev = table[::-1].astype(dtype)
    return jnp.pad(rev, ((0, lanes - rev.shape[0]), (0, 0)))


def relpos_attention_pallas(q, k, v, rel_pos_h, rel_pos_w, *, grid, scale=None,
                            block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                            interpret: bool = False):
    """q, k, v [batch, heads, H*W, head_dim] (bf16 or f32) → [batch, heads, H*W, head_dim].

    rel_pos_h [2H-1, head_dim], rel_pos_w [2W-1, head_dim]; differentiable in all five inputs.
    """
    check_relpos_inputs(q, k, v, rel_pos_h, rel_pos_w, grid)
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"relpos_attention_pallas: q dtype {q.dtype} unsupported (float32 or bfloat16)")
    H, W = grid
    b, nh, n, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    bq, bk, n_pad = tile_sizes(n, block_q, block_k)
    lanes_h, lanes_w = _round_up(2 * H - 1, _LANES), _round_up(2 * W - 1, _LANES)
    packed = lanes_h == lanes_w == _LANES  # H, W <= 64: h and w rows share one lane tile
    st = kernels.KernelStatics(scale=scale, bits_h=max(1, (H - 1).bit_length()),
                               bits_w=max(1, (W - 1).bit_length()), packed=packed,
                               w_offset=H if packed else lanes_h, masked=n_pad > n,
                               f32=q.dtype == jnp.float32)
    layout = _Layout(grid=(H, W), n=n, n_pad=n_pad, block_q=bq, block_k=bk, lanes_h=lanes_h,
                     lanes_w=lanes_w, lanes_x=_LANES if packed else lanes_h + lanes_w,
                     interpret=bool(interpret), st=st)

    def heads_flat(x):
        x = x.reshape(b * nh, n, d)
        return jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0))) if n_pad > n else x

    out = _flash(heads_flat(q), heads_flat(k), heads_flat(v),
                 _reversed_table(rel_pos_h, layout.lanes_h, q.dtype),
                 _reversed_table(rel_pos_w, layout.lanes_w, q.dtype), layout)
    return out[:, :n].reshape(b, nh, n, d)


__all__ = ["relpos_attention_pallas", "tile_sizes", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_K"]
