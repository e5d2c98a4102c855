"""The VL adaptor (official `MlpProjector`): vision features → LM embedding width.

- `mlp_gelu` (1.3B): Linear(in→D), then (GELU, Linear(D→D)) × (depth−1).
- `low_high_hybrid_split_mlp_gelu` (7B): high→D/2 and low→D/2, concatenated **[high, low]**, then
  (GELU, Linear(D→D)) × (depth−1).
- `linear`: one Linear(in→D); `identity`: nothing (in must equal D).
All GELUs are the exact erf form.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dsvl_jax.config import VLMConfig
from dsvl_jax.models.common import activation, dense


class Aligner(nn.Module):
    cfg: VLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, low, high=None):
        c = self.cfg
        d = c.text.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gelu = activation("gelu")
        if c.adapter == "identity":
            if low.shape[-1] != d:
                raise ValueError(f"identity adapter: vision width {low.shape[-1]} != LM width {d}")
            return low.astype(self.dtype)
        if c.adapter == "linear":
            return dense(d, ("vis_embed", "embed"), **kw, name="fc_0")(low)
        if c.adapter == "mlp_gelu":
            x = dense(d, ("vis_embed", "embed"), **kw, name="fc_0")(low)
            first = 1
        else:  # low_high_hybrid_split_mlp_gelu
            if high is None:
                raise ValueError("the hybrid adapter needs high-resolution features")
            h = dense(d // 2, ("vis_embed", "embed"), **kw, name="high_up_proj")(high)
            l_ = dense(d // 2, ("vis_embed", "embed"), **kw, name="low_up_proj")(low)
            x = jnp.concatenate([h, l_], axis=-1)
            first = 1
        for i in range(first, c.adapter_depth):
            x = dense(d, ("mlp", "embed"), **kw, name=f"fc_{i}")(gelu(x))
        return x
