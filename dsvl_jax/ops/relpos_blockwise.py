"""Blockwise XLA SAM attention with decomposed relative positions (GPU and CPU path).

Query blocks of `block_q` rows run one after another (`lax.map` forward, `lax.scan` backward), each
against all keys: the live logits are [batch, heads, block_q, N], never [.., N, N]. The bias rows of
a block come from `q_blk @ table^T` plus a per-row index pick, so the gathered [H, H, d] tables of
the reference are not needed either. A `jax.custom_vjp` keeps the backward at the same O(N * block_q):
it saves only the output and the logsumexp, and recomputes each block's probabilities.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsvl_jax.ops.reference import check_relpos_inputs

DEFAULT_BLOCK_Q = 512
_F32 = jnp.float32


def _block_rel(qb, rows, rel_pos_h, rel_pos_w, grid):
    """Bias rows of the queries `rows` [bq]: rel_h [B, h, bq, H] and rel_w [B, h, bq, W] (float32)."""
    H, W = grid
    th = jnp.einsum("bnqd,rd->bnqr", qb, rel_pos_h.astype(qb.dtype), preferred_element_type=_F32)
    tw = jnp.einsum("bnqd,rd->bnqr", qb, rel_pos_w.astype(qb.dtype), preferred_element_type=_F32)
    qh, qw = rows // W, rows % W
    idx_h = qh[:, None] - jnp.arange(H)[None, :] + H - 1  # [bq, H]: table row for (query, key row)
    idx_w = qw[:, None] - jnp.arange(W)[None, :] + W - 1
    pick = jnp.arange(rows.shape[0])[:, None]
    return th[:, :, pick, idx_h], tw[:, :, pick, idx_w]


def _block_logits(qb, k, rel_h, rel_w, grid, scale):
    H, W = grid
    b, nh, bq, _ = qb.shape
    s = scale * jnp.einsum("bnqd,bnkd->bnqk", qb, k, preferred_element_type=_F32)
    s = s.reshape(b, nh, bq, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    return s.reshape(b, nh, bq, H * W)


def _split_blocks(x, block_q, n_pad):
    """[B, h, N, ...] → [n_blocks, B, h, block_q, ...] (zero rows pad the last block)."""
    n = x.shape[2]
    if n_pad > n:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, n_pad - n)] + [(0, 0)] * (x.ndim - 3))
    x = x.reshape(x.shape[:2] + (n_pad // block_q, block_q) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _join_blocks(x, n):
    """Inverse of `_split_blocks`."""
    x = jnp.moveaxis(x, 0, 2)
    x = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])
    return x[:, :, :n]


def _row_ids(n, block_q, n_pad):
    """[n_blocks, block_q] token index of each query row; padding rows repeat the last real token."""
    return jnp.minimum(jnp.arange(n_pad), n - 1).reshape(n_pad // block_q, block_q)


def _forward(q, k, v, rel_pos_h, rel_pos_w, grid, scale, block_q):
    n = q.shape[2]
    n_pad = -(-n // block_q) * block_q

    def one_block(xs):
        qb, rows = xs
        rel_h, rel_w = _block_rel(qb, rows, rel_pos_h, rel_pos_w, grid)
        s = _block_logits(qb, k, rel_h, rel_w, grid, scale)
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - lse[..., None]).astype(v.dtype)
        return jnp.einsum("bnqk,bnkd->bnqd", p, v, preferred_element_type=_F32).astype(q.dtype), lse

    o, lse = jax.lax.map(one_block, (_split_blocks(q, block_q, n_pad), _row_ids(n, block_q, n_pad)))
    return _join_blocks(o, n), _join_blocks(lse, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, rel_pos_h, rel_pos_w, grid, scale, block_q):
    return _forward(q, k, v, rel_pos_h, rel_pos_w, grid, scale, block_q)[0]


def _attention_fwd(q, k, v, rel_pos_h, rel_pos_w, grid, scale, block_q):
    o, lse = _forward(q, k, v, rel_pos_h, rel_pos_w, grid, scale, block_q)
    return o, (q, k, v, rel_pos_h, rel_pos_w, o, lse)


def _attention_bwd(grid, scale, block_q, residuals, do):
    q, k, v, rel_pos_h, rel_pos_w, o, lse = residuals
    H, W = grid
    b, nh, n, d = q.shape
    n_pad = -(-n // block_q) * block_q
    di = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1)  # rowsum(dO * O), flash-attention-2

    def one_block(carry, xs):
        dk, dv, drh, drw = carry
        qb, rows, dob, lseb, dib = xs
        (rel_h, rel_w), rel_vjp = jax.vjp(
            lambda qq, th, tw: _block_rel(qq, rows, th, tw, grid), qb, rel_pos_h, rel_pos_w)
        s = _block_logits(qb, k, rel_h, rel_w, grid, scale)
        p = jnp.exp(s - lseb[..., None])
        dv = dv + jnp.einsum("bnqk,bnqd->bnkd", p.astype(v.dtype), dob, preferred_element_type=_F32)
        dp = jnp.einsum("bnqd,bnkd->bnqk", dob, v, preferred_element_type=_F32)
        ds = p * (dp - dib[..., None])
        # dS summed over the key columns of each key row (kh), and over the key rows of each column (kw).
        ds_grid = ds.reshape(b, nh, block_q, H, W)
        dq_rel, drh_b, drw_b = rel_vjp((ds_grid.sum(-1), ds_grid.sum(-2)))
        ds = ds.astype(q.dtype)
        dq = scale * jnp.einsum("bnqk,bnkd->bnqd", ds, k, preferred_element_type=_F32) + dq_rel.astype(_F32)
        dk = dk + scale * jnp.einsum("bnqk,bnqd->bnkd", ds, qb, preferred_element_type=_F32)
        return (dk, dv, drh + drh_b.astype(_F32), drw + drw_b.astype(_F32)), dq.astype(q.dtype)

    init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32),
            jnp.zeros(rel_pos_h.shape, _F32), jnp.zeros(rel_pos_w.shape, _F32))
    xs = (_split_blocks(q, block_q, n_pad), _row_ids(n, block_q, n_pad), _split_blocks(do, block_q, n_pad),
          _split_blocks(lse, block_q, n_pad), _split_blocks(di, block_q, n_pad))
    (dk, dv, drh, drw), dq = jax.lax.scan(one_block, init, xs)
    return (_join_blocks(dq, n), dk.astype(k.dtype), dv.astype(v.dtype),
            drh.astype(rel_pos_h.dtype), drw.astype(rel_pos_w.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


def relpos_attention_blockwise(q, k, v, rel_pos_h, rel_pos_w, *, grid, scale=None,
                               block_q: int = DEFAULT_BLOCK_Q):
    """q, k, v [batch, heads, H*W, head_dim] → [batch, heads, H*W, head_dim]; O(N * block_q) memory."""
    check_relpos_inputs(q, k, v, rel_pos_h, rel_pos_w, grid)
    if block_q <= 0:
        raise ValueError(f"block_q={block_q}: must be positive")
    n, d = q.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    return _attention(q, k, v, rel_pos_h, rel_pos_w, (int(grid[0]), int(grid[1])), scale,
                      min(int(block_q), n))
