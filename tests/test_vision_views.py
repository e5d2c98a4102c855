"""The official contract's in-model views: normalisation and torchvision's antialiased resize."""
import jax.numpy as jnp
import numpy as np
import torch

from dsvl_jax import config as C
from dsvl_jax.models.vision import antialiased_resize_nchw, views_from_unit_images


def test_antialiased_resize_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    for src, dst in [(1024, 384), (64, 32), (96, 40), (50, 384)]:
        x = rng.uniform(0, 1, size=(2, 3, src, src)).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(dst, dst), mode="bilinear",
                                              antialias=True, align_corners=False).numpy()
        ours = np.asarray(antialiased_resize_nchw(jnp.asarray(x), dst))
        assert np.abs(ours - ref).max() <= 1e-6, (src, dst)


def test_views_normalise_each_branch_with_its_own_statistics():
    cfg = C.deepseek_vl_7b()
    x = np.full((1, 3, 1024, 1024), 0.25, np.float32)
    low, high = views_from_unit_images(jnp.asarray(x), cfg)
    assert low.shape == (1, 3, 384, 384) and high.shape == (1, 3, 1024, 1024)
    np.testing.assert_allclose(np.asarray(low)[0, :, 0, 0], (0.25 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(high)[0, :, 5, 5],
                               (0.25 - np.array(cfg.sam.pixel_mean)) / np.array(cfg.sam.pixel_std), atol=1e-6)
