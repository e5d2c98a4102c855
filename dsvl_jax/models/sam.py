"""SAM-B image encoder (ViTDet) with DeepSeek's necks and down-sampling: the 7B high-resolution branch.

Layout is NHWC throughout. Windowed blocks zero-pad the map bottom/right to a multiple of the
window and attend inside each window without a mask (the padded zeros act as keys, as in the
official code); global blocks attend over the whole grid through `dsvl_jax.ops.relpos_attention`.
Both add decomposed relative positions computed from the *unscaled* query.

Output of the branch (official `sam_b_downsample` + the always-on "sam_hd" side path):
    down(neck(last)) + hd_alpha * down(neck_hd(output of the first global block))
where down = bilinear resize to 4×(SigLIP grid) → 3×3/s2 conv → 3×3/s2 conv (no bias, no activation).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsvl_jax.config import SamConfig
from dsvl_jax.models.common import LayerNorm, activation, boxed, constrain, dense, maybe_remat, patch_embed
from dsvl_jax.ops import relpos_attention
from dsvl_jax.ops.reference import relpos_attention_reference


def window_partition(x, ws):
    """[B, H, W, C] → [B·nh·nw, ws, ws, C] after zero-padding H, W up to multiples of ws."""
    b, h, w, c = x.shape
    ph, pw = (-h) % ws, (-w) % ws
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(windows, ws, padded_hw, hw):
    hp, wp = padded_hw
    h, w = hw
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // ws) * (wp // ws))
    x = windows.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, :h, :w, :]


def conv(features, kernel, *, stride=1, padding=0, dtype, param_dtype, name, in_axis="conv_in",
         out_axis="conv_out"):
    """PyTorch-style Conv2d without bias; explicit symmetric padding (flax 'SAME' would pad (0, 1))."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
                   param_dtype=param_dtype, precision=None,
                   kernel_init=boxed(nn.initializers.he_normal(), ("conv_kernel", "conv_kernel", in_axis, out_axis)),
                   name=name)


class SamBlock(nn.Module):
    cfg: SamConfig
    window: int  # 0 = global attention
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, hd = c.num_attention_heads, c.head_dim
        b, gh, gw, _ = x.shape
        h = LayerNorm(c.layer_norm_eps, **kw, name="norm1")(x)
        if self.window:
            h, padded = window_partition(h, self.window)
            size = (self.window, self.window)
        else:
            size = (gh, gw)
        table_h, table_w = 2 * size[0] - 1, 2 * size[1] - 1
        rel_h = self.param("rel_pos_h", boxed(nn.initializers.zeros, ("vis_pos", "head_dim")), (table_h, hd),
                           self.param_dtype)
        rel_w = self.param("rel_pos_w", boxed(nn.initializers.zeros, ("vis_pos", "head_dim")), (table_w, hd),
                           self.param_dtype)
        n = h.shape[0]
        tokens = h.reshape(n, size[0] * size[1], c.hidden_size)
        proj = lambda name: dense((heads, hd), ("vis_embed", "vis_heads", "head_dim"), use_bias=c.qkv_bias, **kw,
                                  name=name)(tokens).transpose(0, 2, 1, 3)  # [n, heads, N, hd]
        q, k, v = proj("q"), proj("k"), proj("v")
        tables = (rel_h.astype(self.dtype), rel_w.astype(self.dtype))
        if self.window:  # 14x14 windows are short: batched XLA attention is the fast path
            o = relpos_attention_reference(q, k, v, *tables, grid=size, scale=hd ** -0.5)
        else:
            o = relpos_attention(q, k, v, *tables, grid=size, scale=hd ** -0.5, impl=self.attention_impl)
        o = dense(c.hidden_size, ("vis_heads", "head_dim", "vis_embed"), in_axes=(-2, -1), **kw, name="proj")(
            o.transpose(0, 2, 1, 3))
        o = o.reshape(n, size[0], size[1], c.hidden_size)
        if self.window:
            o = window_unpartition(o, self.window, padded, (gh, gw))
        x = x + o
        h = LayerNorm(c.layer_norm_eps, **kw, name="norm2")(x)
        h = activation(c.hidden_act)(dense(c.mlp_dim, ("vis_embed", "vis_mlp"), **kw, name="fc1")(h))
        x = x + dense(c.hidden_size, ("vis_mlp", "vis_embed"), **kw, name="fc2")(h)
        return constrain(x, ("act_batch", None, None, "act_embed"))


class SamNeck(nn.Module):
    """1×1 conv → LayerNorm2d → 3×3 conv → LayerNorm2d (LayerNorm2d = per-pixel norm over channels)."""

    cfg: SamConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(c.output_channels, 1, **kw, in_axis="vis_embed", name="conv1")(x)
        x = LayerNorm(c.layer_norm_eps, **kw, name="norm1")(x)
        x = conv(c.output_channels, 3, padding=1, **kw, name="conv2")(x)
        return LayerNorm(c.layer_norm_eps, **kw, name="norm2")(x)


class SamDownsample(nn.Module):
    """Bilinear resize to 4·out_size, then two 3×3 stride-2 convs C → 2C → 4C (no bias, no activation)."""

    cfg: SamConfig
    out_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = 4 * self.out_size
        # F.interpolate(bilinear, align_corners=False) in float32: half-pixel centres, edge clamp, no antialias.
        x = jax.image.resize(x.astype(jnp.float32), (x.shape[0], s, s, x.shape[-1]), "bilinear",
                             antialias=False).astype(self.dtype)
        x = conv(2 * c.output_channels, 3, stride=2, padding=1, **kw, name="conv1")(x)
        return conv(4 * c.output_channels, 3, stride=2, padding=1, **kw, name="conv2")(x)


class SamTower(nn.Module):
    """pixels [B, S, S, 3] (NHWC, CLIP-normalised) → features [B, out_size², 4·output_channels]."""

    cfg: SamConfig
    out_size: int
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = patch_embed(pixels, c, **kw)
        pos = self.param("pos_embed", boxed(nn.initializers.zeros, (None, "vis_pos", "vis_pos", "vis_embed")),
                         (1, c.grid, c.grid, c.hidden_size), self.param_dtype)
        x = x + pos.astype(self.dtype)
        block = maybe_remat(SamBlock, self.remat_policy, scanned=False)  # windowed and global blocks differ: a loop
        hd_source = None
        for i in range(c.num_hidden_layers):
            window = 0 if i in c.global_attn_indexes else c.window_size
            x = block(c, window, self.attention_impl, **kw, name=f"blocks_{i}")(x)
            if i == c.global_attn_indexes[0]:
                hd_source = x
        down = SamDownsample(c, self.out_size, **kw, name="downsample")
        out = down(SamNeck(c, **kw, name="neck")(x))
        alpha = self.param("hd_alpha", boxed(nn.initializers.zeros, (None,)), (1,), self.param_dtype)
        out = out + down(SamNeck(c, **kw, name="neck_hd")(hd_source)) * alpha.astype(self.dtype)
        b = out.shape[0]
        return out.reshape(b, self.out_size * self.out_size, 4 * c.output_channels)
