"""`relpos_attention`: SAM global attention with decomposed relative positions, by implementation."""
from __future__ import annotations

from dsvl_jax.ops.reference import relpos_attention_reference

IMPLS = ("auto", "reference")


def relpos_attention(q, k, v, rel_pos_h, rel_pos_w, *, grid, scale=None, impl="auto"):
    """q, k, v [batch, heads, H*W, head_dim]; rel_pos_h [2H-1, d]; rel_pos_w [2W-1, d]; grid=(H, W)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    return relpos_attention_reference(q, k, v, rel_pos_h, rel_pos_w, grid=grid, scale=scale)
