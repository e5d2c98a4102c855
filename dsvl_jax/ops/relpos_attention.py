"""`relpos_attention`: SAM global attention with decomposed relative positions, by implementation.

impl:
  "auto"             Pallas kernel on TPU, blockwise XLA elsewhere (GPU, CPU).
  "pallas"           Mosaic TPU kernel (`relpos_pallas`), O(N * d) memory, fused backward.
  "pallas_interpret" the same kernel through the Pallas interpreter (runs on CPU; for tests).
  "blockwise"        XLA query blocks with a recomputing custom_vjp (`relpos_blockwise`), O(N * block).
  "reference"        plain XLA with the [B, h, N, N] logits materialised (`reference`).
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from dsvl_jax.sharding import logical_to_spec

from dsvl_jax.ops.reference import relpos_attention_reference
from dsvl_jax.ops.relpos_blockwise import relpos_attention_blockwise
from dsvl_jax.ops.relpos_pallas import relpos_attention_pallas

IMPLS = ("auto", "pallas", "pallas_interpret", "blockwise", "reference")


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` runs as on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "blockwise"
    return impl


def relpos_attention(q, k, v, rel_pos_h, rel_pos_w, *, grid, scale=None, impl: str = "auto",
                     block_q: int | None = None, block_k: int | None = None):
    """SAM attention: softmax(scale q·k + q·R_h[qh-kh+H-1] + q·R_w[qw-kw+W-1]) v.

    q, k, v [batch, heads, H*W, head_dim]; rel_pos_h [2H-1, head_dim]; rel_pos_w [2W-1, head_dim];
    grid=(H, W); scale defaults to head_dim**-0.5 (the relative terms use the unscaled q).
    block_q / block_k override the tile sizes (None: each implementation's default; block_k is only
    used by the Pallas kernel).
    """
    impl = resolve_impl(impl)
    args = (q, k, v, rel_pos_h, rel_pos_w)
    if impl == "reference":
        return relpos_attention_reference(*args, grid=grid, scale=scale)
    if impl == "blockwise":
        blocks = {} if block_q is None else {"block_q": block_q}
        return relpos_attention_blockwise(*args, grid=grid, scale=scale, **blocks)
    blocks = {name: val for name, val in (("block_q", block_q), ("block_k", block_k)) if val is not None}
    kernel = lambda *a: relpos_attention_pallas(*a, grid=grid, scale=scale, interpret=impl == "pallas_interpret",
                                                **blocks)
    return _per_shard(kernel, *args)


def _per_shard(kernel, q, k, v, rel_pos_h, rel_pos_w):
    """Mosaic kernels cannot be partitioned by XLA: under a mesh, run one kernel per shard of the images
    (batch over data×fsdp) and heads (over tensor), with the small tables replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    # Already per-shard (inside a caller's shard_map) or no mesh: nothing to split.
    if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return kernel(q, k, v, rel_pos_h, rel_pos_w)
    spec = logical_to_spec(("act_batch", "act_heads", None, None), q.shape, mesh)
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, P(), P()), out_specs=spec,
                         check_vma=False)(q, k, v, rel_pos_h, rel_pos_w)
