"""Plain-XLA SAM attention with decomposed relative positions: the numerical reference.

Logits for query (qh, qw) and key (kh, kw):
    scale * <q, k> + <q, rel_pos_h[qh - kh + H - 1]> + <q, rel_pos_w[qw - kw + W - 1]>
with the *unscaled* q in the relative terms (MViTv2 / SAM / ViTDet convention). Materialises the
[batch, heads, N, N] logits; fine for 14x14 windows, too big for 64x64 global blocks in training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_relpos_inputs(q, k, v, rel_pos_h, rel_pos_w, grid):
    """Raise ValueError naming the argument when shapes do not describe SAM relpos attention."""
    try:
        H, W = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid={grid!r}: expected a pair (H, W) of ints") from None
    if H < 1 or W < 1:
        raise ValueError(f"grid={grid!r}: both sides must be positive")
    if q.ndim != 4:
        raise ValueError(f"q shape {q.shape}: expected [batch, heads, H*W, head_dim]")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} shape {x.shape} differs from q shape {q.shape}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from q dtype {q.dtype}")
    n, d = q.shape[2], q.shape[3]
    if n != H * W:
        raise ValueError(f"q has {n} tokens but grid {(H, W)} holds {H * W}")
    for name, table, side in (("rel_pos_h", rel_pos_h, H), ("rel_pos_w", rel_pos_w, W)):
        if table.shape != (2 * side - 1, d):
            raise ValueError(f"{name} shape {table.shape}: expected {(2 * side - 1, d)} "
                             f"for grid {(H, W)} and head_dim {d}")


def relative_tables(q, rel_pos_h, rel_pos_w, grid):
    """rel_h [B, h, N, H] and rel_w [B, h, N, W]: the per-query bias rows along each axis."""
    H, W = grid
    b, nh, n, d = q.shape
    qg = q.reshape(b, nh, H, W, d)
    idx_h = jnp.arange(H)[:, None] - jnp.arange(H)[None, :] + H - 1  # [qh, kh]
    idx_w = jnp.arange(W)[:, None] - jnp.arange(W)[None, :] + W - 1
    rh = rel_pos_h[idx_h]  # [H, H, d]
    rw = rel_pos_w[idx_w]  # [W, W, d]
    rel_h = jnp.einsum("bnhwc,hkc->bnhwk", qg, rh.astype(q.dtype), preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("bnhwc,wkc->bnhwk", qg, rw.astype(q.dtype), preferred_element_type=jnp.float32)
    return rel_h.reshape(b, nh, n, H), rel_w.reshape(b, nh, n, W)


def relpos_bias(q, rel_pos_h, rel_pos_w, grid):
    """The full [B, h, N, N] additive bias (float32)."""
    H, W = grid
    b, nh, n, _ = q.shape
    rel_h, rel_w = relative_tables(q, rel_pos_h, rel_pos_w, grid)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B, h, N, H, W]
    return bias.reshape(b, nh, n, H * W)


def relpos_attention_reference(q, k, v, rel_pos_h, rel_pos_w, *, grid, scale=None):
    """q, k, v: [batch, heads, H*W, head_dim] → [batch, heads, H*W, head_dim].

    The scale multiplies the float32 q·k products (not a rounded q), as the kernels do.
    """
    check_relpos_inputs(q, k, v, rel_pos_h, rel_pos_w, grid)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + relpos_bias(q, rel_pos_h, rel_pos_w, grid)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
