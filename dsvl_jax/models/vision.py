"""The vision side: one SigLIP tower (1.3B) or the SAM-B + SigLIP hybrid (7B), plus input contracts.

Two input contracts:
- HF-port: `pixel_values` (low-res, SigLIP-normalised) and, for the hybrid, `high_res_pixel_values`
  (CLIP-normalised), both NCHW.
- official: one [0,1] NCHW image at `cfg.image_size`; each branch normalises it with its own
  mean/std, and the hybrid makes the low-res view inside with an antialiased bilinear resize
  (torchvision `Resize(384, antialias=True)` in the official `HybridVisionTower`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsvl_jax.config import VLMConfig
from dsvl_jax.models.common import LayerNorm
from dsvl_jax.models.sam import SamTower
from dsvl_jax.processing.image import antialias_matrix
from dsvl_jax.models.siglip import SiglipTower


def normalize_nchw(x, mean, std):
    mean = jnp.asarray(mean, jnp.float32)[None, :, None, None]
    std = jnp.asarray(std, jnp.float32)[None, :, None, None]
    return (x.astype(jnp.float32) - mean) / std


def antialiased_resize_nchw(x, size: int):
    """torchvision `Resize(size, antialias=True)` of a float tensor: separable antialiased bilinear.

    Applied as two matmuls with the filter as dense constant matrices (PyTorch's own float32 tap
    weights); `jax.image.resize(antialias=True)` uses other weights and differs by ~1e-5."""
    h, w = x.shape[-2:]
    mh = jnp.asarray(antialias_matrix(h, size))
    mw = jnp.asarray(antialias_matrix(w, size))
    x = jnp.einsum("nchw,ow->ncho", x.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("ncho,ph->ncpo", x, mh, precision=jax.lax.Precision.HIGHEST)


def views_from_unit_images(images, cfg: VLMConfig):
    """Official contract → HF-port contract: [N,3,S,S] in [0,1] → (pixel_values, high_res_pixel_values)."""
    if cfg.sam is None:
        return normalize_nchw(images, cfg.siglip.pixel_mean, cfg.siglip.pixel_std), None
    high = normalize_nchw(images, cfg.sam.pixel_mean, cfg.sam.pixel_std)
    low = antialiased_resize_nchw(images, cfg.siglip.image_size)
    return normalize_nchw(low, cfg.siglip.pixel_mean, cfg.siglip.pixel_std), high


class VisionTowers(nn.Module):
    """(low [N,3,s,s], high [N,3,S,S] | None) NCHW → (low features [N, g², C_low], high [N, g², 4·C_out] | None)."""

    cfg: VLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.siglip = SiglipTower(c.siglip, remat_policy=c.tower_remat("siglip"), **kw)
        if c.sam is not None:
            self.sam = SamTower(c.sam, c.hd_output_size, c.sam_attention_impl, remat_policy=c.tower_remat("sam"), **kw)
            if c.unused_hybrid_norms:
                # The official HybridVisionTower builds these two LayerNorms and never calls them; the 7B
                # checkpoints store them. Kept only so that conversion is lossless.
                self.high_layer_norm = LayerNorm(param_dtype=self.param_dtype)
                self.low_layer_norm = LayerNorm(param_dtype=self.param_dtype)

    def encode_low(self, pixel_values):
        return self.siglip(jnp.transpose(pixel_values, (0, 2, 3, 1)))

    def encode_high(self, high_res_pixel_values):
        return self.sam(jnp.transpose(high_res_pixel_values, (0, 2, 3, 1)))

    def __call__(self, pixel_values, high_res_pixel_values=None):
        c = self.cfg
        low = self.encode_low(pixel_values)
        high = None
        if c.sam is not None:
            if high_res_pixel_values is None:
                raise ValueError("the hybrid model needs high_res_pixel_values (or [0,1] `images`)")
            high = self.encode_high(high_res_pixel_values)
            if c.unused_hybrid_norms and self.is_initializing():
                pd = self.param_dtype
                self.high_layer_norm(jnp.zeros((1, high.shape[-1]), pd))
                self.low_layer_norm(jnp.zeros((1, low.shape[-1]), pd))
        return low, high
