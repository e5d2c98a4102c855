"""Forward on an 8-device CPU mesh with params sharded by the logical rules equals one device; bf16
stays within bf16 tolerance of fp32."""
import jax
import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax import sharding
from dsvl_jax.convert.load import load_pretrained
from tests.helpers import torch_ref as R


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = C.tiny()
    path = str(tmp_path_factory.mktemp("tiny"))
    R.save_hf(R.hf_model(cfg, seed=4), path)
    return cfg, path


def _batch(cfg, seed=0):
    ids = R.prompt_ids(cfg, [1, 2, 1, 1], length=cfg.num_image_tokens * 2 + 10, seed=seed)
    pv, hv = R.image_batch(cfg, 5, seed=seed)
    return ids, pv, hv


@pytest.fixture(scope="module")
def single_device(checkpoint):
    """The batch and its float32 logits on one device (the reference of every test here)."""
    cfg, path = checkpoint
    ids, pv, hv = _batch(cfg)
    return (ids, pv, hv), np.asarray(load_pretrained(path)(ids, pixel_values=pv, high_res_pixel_values=hv))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_forward_equals_single_device(checkpoint, single_device, mesh_shape):
    cfg, path = checkpoint
    assert jax.device_count() == 8
    (ids, pv, hv), single = single_device
    mesh = sharding.make_mesh(*mesh_shape)
    vlm = load_pretrained(path, mesh=mesh)
    # the parameters really are sharded (tensor over heads/MLP, fsdp over the width)
    leaves = jax.tree.leaves(vlm.params)
    if mesh_shape[2] > 1:
        assert any("tensor" in str(x.sharding.spec) for x in leaves)
    if mesh_shape[1] > 1:
        assert any("fsdp" in str(x.sharding.spec) for x in leaves)
    out = np.asarray(vlm(ids, pixel_values=pv, high_res_pixel_values=hv))
    assert np.abs(out - single).max() <= 1e-5


def test_bf16_forward_within_bf16_tolerance(checkpoint, single_device):
    cfg, path = checkpoint
    (ids, pv, hv), ref = single_device
    vlm16 = load_pretrained(path, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(vlm16.params))
    out = np.asarray(vlm16(ids, pixel_values=pv, high_res_pixel_values=hv))
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%); a few layers of rounding stay within a few steps.
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max() / scale
    assert err <= 4 * 2.0 ** -8, err
    # and the ranking of the top token barely moves
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
