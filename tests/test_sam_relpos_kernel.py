"""The SAM encoder run with the relpos kernels equals the SAM encoder run with the reference attention:
forward output and the gradients of every parameter and of the pixels (float32, tiny config).

The tiny SAM has an 8 x 8 grid with 2 heads of 16 in its global blocks (64 tokens: the Pallas path
pads them to one 128-token tile and masks the padded keys).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dsvl_jax.config import tiny
from dsvl_jax.models.sam import SamTower

pytestmark = pytest.mark.slow  # compiles the SAM encoder's forward + backward twice


@pytest.fixture(scope="module")
def tiny_sam():
    """Module factory, random parameters (not SAM's init, which zeroes the rel-pos tables and hd_alpha
    and would hide a wrong bias), pixels, an output cotangent and the reference results."""
    cfg = tiny()

    def tower(impl):
        return SamTower(cfg.sam, cfg.hd_output_size, impl)

    size = cfg.sam.image_size
    pixels = jax.random.normal(jax.random.key(0), (2, size, size, cfg.sam.num_channels))
    shapes = nn.meta.unbox(jax.eval_shape(tower("reference").init, jax.random.key(1), pixels))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    # Norm scales around 1, everything else around 0: activations stay O(1) through the blocks.
    params = jax.tree.unflatten(treedef, [
        float(jax.tree_util.keystr(path).endswith("['scale']")) + 0.2 * jax.random.normal(k, p.shape, p.dtype)
        for (path, p), k in zip(leaves, keys)])
    out_shape = jax.eval_shape(tower("reference").apply, params, pixels).shape
    ct = jax.random.normal(jax.random.key(3), out_shape)
    return tower, params, pixels, ct, run(tower, "reference", params, pixels, ct)


def run(tower, impl, params, pixels, ct):
    def forward(p, x):
        return tower(impl).apply(p, x)

    def step(p, x):
        out, vjp = jax.vjp(forward, p, x)
        return out, vjp(ct)

    return jax.jit(step)(params, pixels)


def _check_against_reference(tiny_sam, out, d_params, d_pixels):
    tower, params, pixels, ct, (want_out, (want_params, want_pixels)) = tiny_sam
    scale = float(jnp.max(jnp.abs(want_out)))
    assert float(jnp.max(jnp.abs(out - want_out))) <= 1e-5 * max(1.0, scale)
    got = {"pixels": d_pixels, **{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(d_params)}}
    want = {"pixels": want_pixels,
            **{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want_params)}}
    assert got.keys() == want.keys()
    global_tables = [name for name in want if "rel_pos" in name and "blocks_1" in name]
    assert global_tables, "expected the global block's rel_pos tables among the parameters"
    for name in want:
        ref_max = float(jnp.max(jnp.abs(want[name])))
        err = float(jnp.max(jnp.abs(got[name] - want[name])))
        if name.endswith("['k']['bias']"):
            # A key bias adds the same q·b to every logit of a row: softmax cancels it, so its gradient is
            # zero up to rounding in both runs. Measure it against the key kernel's gradient instead.
            kernel_max = float(jnp.max(jnp.abs(want[name.replace("['bias']", "['kernel']")])))
            for grad in (got[name], want[name]):
                assert float(jnp.max(jnp.abs(grad))) <= 1e-4 * kernel_max, f"{name}: not ~0"
            continue
        assert ref_max > 0, f"{name}: reference gradient is all zero"
        assert err <= 1e-4 * ref_max, f"{name}: relative error {err / ref_max:.2e}"


def test_sam_encoder_with_kernel_equals_reference_attention(tiny_sam):
    tower, params, pixels, ct, _ = tiny_sam
    out, (d_params, d_pixels) = run(tower, "pallas_interpret", params, pixels, ct)
    _check_against_reference(tiny_sam, out, d_params, d_pixels)


def test_kernel_runs_per_shard_on_a_mesh(tiny_sam):
    """Under a (data, fsdp, tensor) mesh the kernel runs once per shard (images over data, heads over
    tensor; XLA cannot partition a Mosaic kernel): same output and gradients as the reference."""
    from dsvl_jax.sharding import make_mesh
    tower, params, pixels, ct, _ = tiny_sam
    with jax.set_mesh(make_mesh(2, 2, 2)):
        out, (d_params, d_pixels) = run(tower, "pallas_interpret", params, pixels, ct)
    _check_against_reference(tiny_sam, out, d_params, d_pixels)
