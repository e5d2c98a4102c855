"""Plain-XLA SAM attention with decomposed relative positions: the numerical reference.

Logits for query (qh, qw) and key (kh, kw):
    scale * <q, k> + <q, rel_pos_h[qh - kh + H - 1]> + <q, rel_pos_w[qw - kw + W - 1]>
with the *unscaled* q in the relative terms (MViTv2 / SAM / ViTDet convention). Materialises the
[batch, heads, N, N] logits; fine for 14x14 windows, too big for 64x64 global blocks in training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
    """q, k, v: [batch, heads, H*W, head_dim] → [batch, heads, H*W, head_dim]."""
    H, W = grid
    if q.shape[2] != H * W:
        raise ValueError(f"q has {q.shape[2]} tokens but grid {grid} holds {H * W}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    logits = logits + relpos_bias(q, rel_pos_h, rel_pos_w, grid)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
