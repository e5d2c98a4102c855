"""Building blocks shared by the towers and the decoder: param factories with logical axis names,
LayerNorm that matches PyTorch, activations, activation sharding constraints and remat policies."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsvl_jax import sharding

Dtype = jnp.dtype


def dtype_of(name) -> jnp.dtype:
    return jnp.dtype(name)


def boxed(init, names: Sequence[str | None]):
    """An initializer whose params carry logical axis names (flax `LogicallyPartitioned`)."""
    return nn.with_logical_partitioning(init, tuple(names))


def normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


def dense(features, axes: Sequence[str | None], *, in_axes=-1, use_bias=True, dtype, param_dtype,
          name=None, std=0.02, bias_axes=None):
    """`nn.DenseGeneral` with a logically named kernel (in dims first, then out dims) and bias."""
    feats = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    if bias_axes is None:
        bias_axes = tuple(axes[-len(feats):])
    return nn.DenseGeneral(
        features=features, axis=in_axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=boxed(normal(std), axes), bias_init=boxed(nn.initializers.zeros, bias_axes),
        precision=None, name=name)


def patch_embed(pixels, cfg, *, dtype, param_dtype, name="patch_embed"):
    """Check the NHWC image size, then the non-overlapping p×p patch conv (with bias) of a ViT."""
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixels.shape[1:]) != want:
        raise ValueError(f"{type(cfg).__name__[:-6]} expects images [B, {want[0]}, {want[1]}, {want[2]}], "
                         f"got {tuple(pixels.shape)}")
    return PatchEmbed(cfg.patch_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, name=name)(pixels)


class PatchEmbed(nn.Module):
    """The p×p stride-p conv as patchify + one matmul: [N, H, W, C] → [N, H/p, W/p, D].

    Same params as `nn.Conv` (kernel [p, p, C, D], bias [D]). Written as a reshape to [N, H/p, W/p, p·p·C]
    because a conv wants its input laid out NHWC, and on TPU an NHWC image with C = 3 pads the channel
    (lane) dim to 128: 43x the pixels' bytes, which XLA then holds for every image of every micro-batch
    when it hoists the layout change out of the gradient-accumulation loop (tools/aot_compile.py's
    one-row-per-chip anomaly). The patch vectors (p·p·C = 768 wide) need no padding."""

    patch: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        p = self.patch
        kernel = self.param("kernel", boxed(normal(), ("conv_kernel", "conv_kernel", "conv_in", "vis_embed")),
                            (p, p, c, self.features), self.param_dtype)
        bias = self.param("bias", boxed(nn.initializers.zeros, ("vis_embed",)), (self.features,), self.param_dtype)
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // p, w // p, p * p * c)
        y = jnp.dot(x.astype(self.dtype), kernel.reshape(p * p * c, self.features).astype(self.dtype))
        return y + bias.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32 with the two-pass variance PyTorch uses."""

    eps: float = 1e-6
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", boxed(nn.initializers.ones, (self.axis_name,)), (c,), self.param_dtype)
        bias = self.param("bias", boxed(nn.initializers.zeros, (self.axis_name,)), (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then multiply by the weight (HF order)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", boxed(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(self.dtype)


def activation(name: str):
    """PyTorch-named activations. 'gelu' is the exact erf form (PyTorch default), not flax's tanh one."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unknown activation {name!r}")


def constrain(x, names: Sequence[str | None]):
    """Sharding constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = sharding.logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def remat_policy(name: str):
    """Checkpoint policy by name: what the backward pass may keep instead of recomputing."""
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "everything": jax.checkpoint_policies.everything_saveable,
    }
    if name not in policies:
        raise ValueError(f"remat_policy={name!r}: expected 'none' or one of {sorted(policies)}")
    return policies[name]


def maybe_remat(module_cls, policy_name: str, static_argnums=(), scanned: bool = True):
    """`module_cls` under the named checkpoint policy. `scanned=False` for blocks called in a Python loop: there
    XLA's CSE would merge the backward's recomputation with the forward and keep every activation (SAM's
    compiled temp memory did not move with full remat); inside a scan the loop already keeps them apart."""
    if policy_name == "none":
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy_name), prevent_cse=not scanned,
                    static_argnums=static_argnums)


def softmax_attention(q, k, v, bias=None, *, scale):
    """Plain attention over [..., q, heads, d] / [..., k, heads, d]; logits and softmax in float32."""
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)
