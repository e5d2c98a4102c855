"""SigLIP ViT: the 1.3B tower and the 7B low-resolution branch.

Pre-norm ViT without class token: patch conv + absolute positions, `num_hidden_layers` blocks (the
official `select_layer` truncation is applied when the config is built), then the final LayerNorm.
The MAP pooling head exists in the checkpoints but DeepSeek-VL never runs it; its parameters are
created (so conversion is lossless) and left untouched.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dsvl_jax.config import SiglipConfig
from dsvl_jax.models.common import LayerNorm, activation, boxed, constrain, dense, maybe_remat, normal, patch_embed
from dsvl_jax.models.common import softmax_attention


class SiglipBlock(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, hd = c.num_attention_heads, c.head_dim
        h = LayerNorm(c.layer_norm_eps, **kw, name="norm1")(x)
        q = dense((heads, hd), ("vis_embed", "vis_heads", "head_dim"), **kw, name="q")(h)
        k = dense((heads, hd), ("vis_embed", "vis_heads", "head_dim"), **kw, name="k")(h)
        v = dense((heads, hd), ("vis_embed", "vis_heads", "head_dim"), **kw, name="v")(h)
        q = constrain(q, ("act_batch", "act_len", "act_heads", None))
        o = softmax_attention(q, k, v, scale=hd ** -0.5)
        x = x + dense(c.hidden_size, ("vis_heads", "head_dim", "vis_embed"), in_axes=(-2, -1), **kw,
                      name="proj")(o)
        h = LayerNorm(c.layer_norm_eps, **kw, name="norm2")(x)
        h = dense(c.intermediate_size, ("vis_embed", "vis_mlp"), **kw, name="fc1")(h)
        h = constrain(activation(c.hidden_act)(h), ("act_batch", "act_len", "act_mlp"))
        x = x + dense(c.hidden_size, ("vis_mlp", "vis_embed"), **kw, name="fc2")(h)
        return constrain(x, ("act_batch", "act_len", "act_embed")), None


class MapHeadParams(nn.Module):
    """Parameters of the attention-pooling (MAP) head. Stored in every checkpoint, never run."""

    cfg: SiglipConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        c, pd = self.cfg, self.param_dtype
        self.param("latent", boxed(normal(), (None, None, "vis_embed")), (1, 1, c.hidden_size), pd)
        kw = dict(dtype=pd, param_dtype=pd)
        # Touch every sub-layer once on a dummy row so that flax creates its params.
        z = jnp.zeros((1, c.hidden_size), pd)
        dense(c.hidden_size, ("vis_embed", "vis_mlp"), **kw, name="q")(z)
        dense(2 * c.hidden_size, ("vis_embed", "vis_mlp"), **kw, name="kv")(z)
        dense(c.hidden_size, ("vis_mlp", "vis_embed"), **kw, name="proj")(z)
        LayerNorm(c.layer_norm_eps, param_dtype=pd, name="norm")(z)
        h = dense(c.intermediate_size, ("vis_embed", "vis_mlp"), **kw, name="fc1")(z)
        dense(c.hidden_size, ("vis_mlp", "vis_embed"), **kw, name="fc2")(h)


class SiglipTower(nn.Module):
    """pixels [B, S, S, 3] (NHWC, already normalised) → features [B, grid², hidden]."""

    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        x = patch_embed(pixels, c, dtype=self.dtype, param_dtype=self.param_dtype)
        b = x.shape[0]
        x = x.reshape(b, c.num_patches, c.hidden_size)
        pos = self.param("pos_embed", boxed(normal(), ("vis_pos", "vis_embed")),
                         (c.num_patches, c.hidden_size), self.param_dtype)
        x = constrain(x + pos.astype(self.dtype), ("act_batch", "act_len", "act_embed"))
        block = maybe_remat(SiglipBlock, self.remat_policy)
        kw = dict(cfg=c, dtype=self.dtype, param_dtype=self.param_dtype)
        # Blocks are stacked on a leading "layers" axis and scanned: one compiled body for all of them.
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
            **kw, name="blocks")(x, None)
        x = LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        if c.use_head and self.is_initializing():  # created once for lossless conversion, never run
            MapHeadParams(c, self.param_dtype, name="head")()
        return x
