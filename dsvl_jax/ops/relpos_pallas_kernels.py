"""Kernel bodies of the Pallas (Mosaic TPU) SAM attention with decomposed relative positions.

One (batch*head) slice, one query tile of `bq` rows and one key tile of `bk` columns per grid step.
The logits of a tile are

    s[i, j] = scale * <q_i, k_j> + rel_h[i, kh(j)] + rel_w[i, kw(j)]
    rel_h[i, c] = <q_i, R_h[qh(i) - c + H - 1]>        (rel_w likewise along the width)

and are built from q and the two tables inside the kernel, never as an N x N array:

1. `t = q @ Rrev_h^T` with the table reversed (row u holds R_h[2H-2-u]) and zero-padded to L lanes.
   Then rel_h[i, c] = t[i, c + H-1-qh(i)]: row i is rotated left by its own shift H-1-qh(i).
   A per-row rotation is a barrel shifter: one static lane roll + select per bit of the shift
   (log2 H steps, no gather; Mosaic has no vector gather and no cheap integer division).
2. The h and w rows share one array x: with H, W <= 64 (SAM's 64 x 64 included) both fit one 128-lane
   tile, w at lane offset H ("packed"); otherwise x is the two tiles side by side. One one-hot
   matmul spreads x over the key tile: onehot[c, j] = [c == kh(j)] + [c == off + kw(j)], so
   bias = x @ onehot. Lanes of x that hold rotation junk meet all-zero one-hot rows.

Backward (flash-attention-2): dS = P * (dP - rowsum(dO * O)). The table path runs in reverse:
dx = dS @ onehot^T (dS summed over the key columns of each key row kh), rotate right by the same
shift, then dq += dx_rot @ Rrev and dRrev += dx_rot^T @ q (the scatter to table rows qh-kh+H-1).
Per-query and per-key grid coordinates come in as small int32 inputs (no in-kernel division).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Large finite negative, not -inf: exp(mask - running max) stays NaN-free for any tile of keys.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelStatics:
    """Compile-time facts shared by the three kernels (hashable: it rides in custom_vjp statics)."""

    scale: float
    bits_h: int  # bits of the largest row shift H-1
    bits_w: int
    packed: bool  # h and w rows share one 128-lane tile (H, W <= 64)
    w_offset: int  # lane where the w rows start in x: H when packed, else the h tile width
    masked: bool  # keys were padded: columns with kh < 0 are masked out
    f32: bool  # inputs are float32 (full-precision matmuls) rather than bf16


def _precision(st: KernelStatics):
    return lax.Precision.HIGHEST if st.f32 else lax.Precision.DEFAULT


def _dot(a, b, st, contract=((1,), (0,))):
    return lax.dot_general(a, b, (contract, ((), ())), precision=_precision(st),
                           preferred_element_type=jnp.float32)


def _dot_nt(a, b, st):  # a @ b.T
    return _dot(a, b, st, ((1,), (1,)))


def _dot_tn(a, b, st):  # a.T @ b
    return _dot(a, b, st, ((0,), (0,)))


def _rotate_rows(x, shifts, bits, left):
    """Rotate each row of x [r, L] by its own shift (shifts [r, 1] int32, < 2**bits < L)."""
    lanes = x.shape[1]
    for b in range(bits):
        step = 1 << b
        rolled = pltpu.roll(x, lanes - step if left else step, 1)
        x = jnp.where(((shifts >> b) & 1) == 1, rolled, x)
    return x


def _onehot(kh, kw, lanes, dtype):
    """[lanes, bk]: 1 at rows kh[0, j] and kw[0, j] (kw already offset; ids < 0 give a zero column)."""
    rows = lax.broadcasted_iota(jnp.int32, (lanes, kh.shape[1]), 0)
    # Select in 32 bits, then cast: a bf16 select on a 32-bit compare mask needs a relayout Mosaic lacks.
    return jnp.where((rows == kh) | (rows == kw), 1.0, 0.0).astype(dtype)


def _lanes(x):
    return lax.broadcasted_iota(jnp.int32, x.shape, 1)


def _pack(xh, xw, st):
    """The rotated h rows (valid in lanes [0, H)) and w rows (valid in [0, W)) as one array x."""
    if st.packed:
        return jnp.where(_lanes(xh) < st.w_offset, xh, pltpu.roll(xw, st.w_offset, 1))
    return jnp.concatenate([xh, xw], axis=1)  # both whole 128-lane tiles


def _unpack(dx, st):
    """Transpose of `_pack`: the cotangents of the rotated h rows and w rows."""
    if st.packed:
        lanes = _lanes(dx)
        dxh = jnp.where(lanes < st.w_offset, dx, 0.0)
        dxw = pltpu.roll(jnp.where(lanes >= st.w_offset, dx, 0.0), dx.shape[1] - st.w_offset, 1)
        return dxh, dxw
    return dx[:, :st.w_offset], dx[:, st.w_offset:]


def _expand(x, onehot, st):
    """x [bq, L] float32 spread over the key tile: x @ onehot, keeping ~16 mantissa bits in bf16 mode.

    A one-hot product selects a single entry, so hi + lo (two bf16 passes) reproduces x to 2^-17.
    """
    if st.f32:
        return _dot(x, onehot, st)
    hi = x.astype(onehot.dtype)
    lo = (x - hi.astype(jnp.float32)).astype(onehot.dtype)
    return _dot(hi, onehot, st) + _dot(lo, onehot, st)


def _row_to_col(row):
    """[1, r] → [r, 1] through a (128, r) transpose (Mosaic transposes whole 128-lane tiles)."""
    return jnp.broadcast_to(row, (128, row.shape[1])).T[:, :1]


def _col_to_row(col):
    """[r, 1] → [1, r]; the per-query statistics are stored lane-dense in HBM ([.., 1, N], not [.., N, 1]
    which TPU tiling pads 128-fold)."""
    return jnp.broadcast_to(col, (col.shape[0], 128)).T[:1, :]


def _rel_rows(q, rh_ref, rw_ref, qsh_ref, qsw_ref, st):
    """x [bq, lanes]: per-query bias rows along h and w, rotated into key-row / key-column order."""
    xh = _rotate_rows(_dot_nt(q, rh_ref[...], st), qsh_ref[...], st.bits_h, left=True)
    xw = _rotate_rows(_dot_nt(q, rw_ref[...], st), qsw_ref[...], st.bits_w, left=True)
    return _pack(xh, xw, st)


def _logits(q, k, x, kh, kw, st):
    """The [bq, bk] logits of one tile, with padded keys masked; also the tile's one-hot."""
    onehot = _onehot(kh, kw, x.shape[1], k.dtype)
    s = st.scale * _dot_nt(q, k, st) + _expand(x, onehot, st)
    if st.masked:
        s = jnp.where(kh >= 0, s, MASK_VALUE)
    return s, onehot


def forward_kernel(qsh_ref, qsw_ref, kh_ref, kw_ref, q_ref, k_ref, v_ref, rh_ref, rw_ref,
                   o_ref, lse_ref, x_scr, m_scr, l_scr, acc_scr, *, st: KernelStatics):
    """Grid (batch*heads, query tiles, key tiles); online softmax over the key axis."""
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _start_query_tile():
        x_scr[...] = _rel_rows(q_ref[...], rh_ref, rw_ref, qsh_ref, qsw_ref, st)
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    s, _ = _logits(q_ref[...], k_ref[...], x_scr[...], kh_ref[...], kw_ref[...], st)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)  # key tile 0 always holds a real key, so m_new is finite
    p = jnp.exp(s - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v.dtype), v, st)
    m_scr[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish_query_tile():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(m_scr[...] + jnp.log(l))


def _tile_grads(q, k, v, do, lse, di, x, kh, kw, st):
    """Recompute P of one tile from the saved logsumexp and form dS."""
    s, onehot = _logits(q, k, x, kh, kw, st)
    p = jnp.exp(s - lse)
    dp = _dot_nt(do, v, st)
    ds = p * (dp - di)
    return p, ds, onehot


def dkv_kernel(qsh_ref, qsw_ref, kh_ref, kw_ref, q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref,
               lse_ref, di_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, st: KernelStatics):
    """Grid (batch*heads, key tiles, query tiles): dK and dV accumulate over the query axis."""
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _start_key_tile():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    q, do = q_ref[...], do_ref[...]
    x = _rel_rows(q, rh_ref, rw_ref, qsh_ref, qsw_ref, st)
    p, ds, _ = _tile_grads(q, k_ref[...], v_ref[...], do, _row_to_col(lse_ref[...]),
                           _row_to_col(di_ref[...]), x, kh_ref[...], kw_ref[...], st)
    dv_scr[...] += _dot_tn(p.astype(do.dtype), do, st)
    dk_scr[...] += st.scale * _dot_tn(ds.astype(q.dtype), q, st)

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish_key_tile():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def dq_kernel(qsh_ref, qsw_ref, kh_ref, kw_ref, q_ref, k_ref, v_ref, rh_ref, rw_ref, do_ref,
              lse_ref, di_ref, dq_ref, drh_ref, drw_ref, x_scr, dq_scr, dx_scr, *, st: KernelStatics):
    """Grid (batch*heads, query tiles, key tiles): dQ and the table gradients.

    drh_ref / drw_ref are one block per batch*head that stays resident over both tile axes (hence
    both are 'arbitrary') and sums dRrev over all query tiles.
    """
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when((i == 0) & (j == 0))
    def _start_head():
        drh_ref[...] = jnp.zeros(drh_ref.shape, jnp.float32)
        drw_ref[...] = jnp.zeros(drw_ref.shape, jnp.float32)

    @pl.when(j == 0)
    def _start_query_tile():
        x_scr[...] = _rel_rows(q_ref[...], rh_ref, rw_ref, qsh_ref, qsw_ref, st)
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
        dx_scr[...] = jnp.zeros(dx_scr.shape, jnp.float32)

    q, k = q_ref[...], k_ref[...]
    _, ds, onehot = _tile_grads(q, k, v_ref[...], do_ref[...], _row_to_col(lse_ref[...]),
                                _row_to_col(di_ref[...]), x_scr[...], kh_ref[...], kw_ref[...], st)
    ds = ds.astype(k.dtype)
    dq_scr[...] += st.scale * _dot(ds, k, st)
    # dS summed over the key columns of each key row (h lanes) and the key rows of each column (w lanes).
    dx_scr[...] += _dot_nt(ds, onehot, st)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish_query_tile():
        dxh, dxw = _unpack(dx_scr[...], st)
        # Undo the forward rotation: column u of dth is the cotangent of table row 2H-2-u.
        dth = _rotate_rows(dxh, qsh_ref[...], st.bits_h, left=False).astype(q.dtype)
        dtw = _rotate_rows(dxw, qsw_ref[...], st.bits_w, left=False).astype(q.dtype)
        dq = dq_scr[...] + _dot(dth, rh_ref[...], st) + _dot(dtw, rw_ref[...], st)
        dq_ref[...] = dq.astype(dq_ref.dtype)
        drh_ref[...] += _dot_tn(dth, q, st)
        drw_ref[...] += _dot_tn(dtw, q, st)
