"""Weight formats of the LLM's linears: weight-only int8 (per-output-channel symmetric scales, dequantized in
the matmul) and bf16, and `--weights fp32|bf16|int8` conversion of a whole model.

A quantized kernel is stored as two params beside each other: `kernel` (int8, the float kernel's shape and
logical axes, so it is sharded exactly like the float weight) and `scale` (float32, the kernel's *output*
dims and their logical axes). For each output channel j, scale[j] = max_i |w[i, j]| / 127 and
kernel[i, j] = round(w[i, j] / scale[j]) in [-127, 127] (symmetric: no zero point, -128 unused). Because
the scale depends on the output channel only, it factors out of the contraction:

    x @ (q * s) == (x @ q) * s

so the matmul reads int8 weights (converted to the compute dtype inside the dot's fusion; on TPU the
int8 array is what lives in HBM) and multiplies the [.., out] result by the scale afterwards.
On CPU, XLA compiles a dot with a fused int8 (or bf16) operand to a slow generic loop, so there the
contraction runs 512 input rows at a time (`_dot_converted_in_chunks`); bf16 weights of the decoder take
the same path (`Bf16DenseGeneral`, `bf16_matmul`). `lax.platform_dependent` keeps the plain dot on TPU/GPU.
Which params are quantized is decided by `VLMConfig.quantization`: "int8" quantizes the seven linears of
every decoder layer and the (untied) lm_head; embeddings, norms, the vision towers and the aligner stay
in float (they are not read per decoded token, or are small).

Why our own and not qwix (0.1.8, MaxText's library): its PTQ mode intercepts `dot_general` / `einsum`
inside a wrapped module and replaces each param by a `WithAux(QArray(qvalue, scale, ...), how)` pytree
node carrying static "how to quantize" metadata (qwix/_src/providers/ptq.py: WithAux, quantize_params).
Our params are plain nested dicts of arrays everywhere: Orbax saves and partially restores them by
"/"-joined path, `state.check_params` / `param_shapes` compare paths and shapes, the export key map
walks them, and `generation.engine` applies the module through custom `method=` functions. A second kind
of leaf would have to be taught to every one of those; two plain arrays per kernel (int8 + scale, each
with logical axis names) need no change there, shard by the existing rules, and the math is ~40 lines.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax.models.common import boxed, dense, normal

QUANTIZATIONS = ("none", "int8")
INT8_MAX = 127
LAYERS = "language_model/layers/"  # every kernel under it is a bias-free linear (q/k/v/o, gate/up/down)
LM_HEAD = "language_model/lm_head"


def quantize_array(w, n_in: int, lead: int = 0):
    """Float kernel [lead..., in..., out...] → (int8 kernel of the same shape, float32 scale [lead..., out...]).

    `n_in` input dims follow `lead` leading (e.g. stacked-layer) dims; the scale is per output channel."""
    xp = jnp if isinstance(w, jax.Array) else np
    wf = w.astype(np.float32)
    axes = tuple(range(lead, lead + n_in))
    amax = xp.max(xp.abs(wf), axis=axes)
    scale = xp.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)  # an all-zero column keeps scale 1
    s = xp.expand_dims(scale, axes)
    q = xp.clip(xp.round(wf / s), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


# On device: one fused program per kernel shape, so no float temporaries of the kernel's size are kept.
_quantize_fused = jax.jit(quantize_array, static_argnums=(1, 2))


def dequantize_array(q, scale, n_in: int, lead: int = 0, dtype=np.float32):
    """int8 kernel and its scale → the float kernel (q * scale), in `dtype`."""
    xp = jnp if isinstance(q, jax.Array) else np
    s = xp.expand_dims(scale.astype(np.float32), tuple(range(lead, lead + n_in)))
    return (q.astype(np.float32) * s).astype(dtype)


CPU_CHUNK = 512  # input rows converted per step on CPU: a 512 × out float32 block stays in cache


def _dot_converted(x, q, n_in: int, dtype):
    """x [..., in...] · q [in..., out...] with q converted to `dtype` inside the dot's fusion (TPU/GPU:
    the int8 array is what is read from HBM), float32 accumulation."""
    contract_x = tuple(range(x.ndim - n_in, x.ndim))
    return jax.lax.dot_general(x.astype(dtype), q.astype(dtype), ((contract_x, tuple(range(n_in))), ((), ())),
                               preferred_element_type=jnp.float32)


def _dot_converted_in_chunks(x, q, n_in: int, dtype):
    """The same product on CPU, CPU_CHUNK input rows at a time. XLA:CPU hands a dot whose operand is a
    fused int8→float convert to its generic loop emitter (measured 0.2 GB/s of int8 on 2 cores, vs
    10 GB/s for a float32 dot); converting one cache-sized block per loop step and giving the library
    dot a float block reads the int8 weight once at ~1.2 GB/s (benchmarks/generate_vs_torch.py)."""
    k = int(np.prod(q.shape[:n_in]))
    if k % CPU_CHUNK or k == CPU_CHUNK:
        return _dot_converted(x, q, n_in, dtype)
    out = q.shape[n_in:]
    lead = x.shape[:x.ndim - n_in]
    qc = q.reshape((k // CPU_CHUNK, CPU_CHUNK) + out)
    xc = x.reshape(lead + (k // CPU_CHUNK, CPU_CHUNK)).astype(dtype)

    def body(i, acc):
        xi = jax.lax.dynamic_index_in_dim(xc, i, xc.ndim - 2, keepdims=False)
        qi = jax.lax.dynamic_index_in_dim(qc, i, 0, keepdims=False)
        return acc + _dot_converted(xi, qi, 1, dtype)

    return jax.lax.fori_loop(0, k // CPU_CHUNK, body, jnp.zeros(lead + out, jnp.float32))


def int8_matmul(x, q, scale, n_in: int, dtype):
    """x [..., in...] @ dequant(q [in..., out...], scale [out...]) → [..., out...] in `dtype`.

    The scale is applied to the (float32-accumulated) product, not to the weight: same math, and the
    weight goes into the dot as int8. On CPU the contraction runs in blocks (`_dot_converted_in_chunks`)."""
    y = jax.lax.platform_dependent(
        x, q, cpu=lambda x, q: _dot_converted_in_chunks(x, q, n_in, dtype),
        default=lambda x, q: _dot_converted(x, q, n_in, dtype))
    return (y * scale).astype(dtype)


class Int8DenseGeneral(nn.Module):
    """Drop-in for `common.dense(...)` (no bias): params `kernel` int8 (the float kernel's shape and axes)
    and `scale` float32 (the output dims' axes). in_axes are the last len(in_axes) dims of the input."""

    features: int | Sequence[int]
    axes: Sequence[str | None]
    n_in: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        feats = tuple(self.features) if isinstance(self.features, (tuple, list)) else (self.features,)
        in_shape = tuple(x.shape[x.ndim - self.n_in:])
        q = self.param("kernel", boxed(nn.initializers.zeros, self.axes), in_shape + feats, jnp.int8)
        scale = self.param("scale", boxed(nn.initializers.ones, self.axes[self.n_in:]), feats, jnp.float32)
        return int8_matmul(x, q, scale, self.n_in, self.dtype)


class Bf16DenseGeneral(nn.Module):
    """`common.dense` (no bias) for bf16 weights, the same param: on CPU the bf16 kernel is converted to
    float32 a block at a time (`_dot_converted_in_chunks`; XLA:CPU's bf16 dot reads ~0.4 GB/s here, its
    float32 dot ~4-10 GB/s); elsewhere the plain bf16 dot."""

    features: int | Sequence[int]
    axes: Sequence[str | None]
    n_in: int = 1
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        feats = tuple(self.features) if isinstance(self.features, (tuple, list)) else (self.features,)
        in_shape = tuple(x.shape[x.ndim - self.n_in:])
        w = self.param("kernel", boxed(normal(), self.axes), in_shape + feats, self.param_dtype)
        return bf16_matmul(x, w, self.n_in, self.dtype).astype(self.dtype)


def bf16_matmul(x, w, n_in: int, dtype):
    """x @ w for bf16 weights, float32 result: blocks converted to float32 on CPU, a `dtype` dot elsewhere."""
    return jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: _dot_converted_in_chunks(x, w, n_in, jnp.float32),
        default=lambda x, w: _dot_converted(x, w, n_in, dtype))


def linear(features, axes, *, quantized: bool, in_axes=-1, dtype, param_dtype, name):
    """A bias-free decoder linear: `common.dense` in float32, `Bf16DenseGeneral` for bf16 weights,
    `Int8DenseGeneral` when quantized."""
    n_in = len(in_axes) if isinstance(in_axes, (tuple, list)) else 1
    if quantized:
        return Int8DenseGeneral(features, tuple(axes), n_in, dtype, name=name)
    if jnp.dtype(param_dtype) == jnp.bfloat16:
        return Bf16DenseGeneral(features, tuple(axes), n_in, dtype, param_dtype, name=name)
    return dense(features, axes, in_axes=in_axes, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name)


# ---------------------------------------------------------------------------------------------
# whole param trees
# ---------------------------------------------------------------------------------------------
def quantized_kernels(flat: dict) -> dict:
    """{kernel path: (n_in, lead)} of the params "int8" quantizes, among the "/"-joined paths of `flat`."""
    out = {}
    for p in flat:
        if p == LM_HEAD:
            out[p] = (1, 0)
        elif p.startswith(LAYERS) and p.endswith("/kernel"):
            out[p] = (2 if p.endswith("o_proj/kernel") else 1, 1)  # o_proj contracts (heads, head_dim); layers lead
    return out


def _scale_path(p: str) -> str:
    return p[:-len("/kernel")] + "/scale" if p.endswith("/kernel") else p + "_scale"


def quantize_params(params) -> dict:
    """A float param tree → the tree `quantization="int8"` builds (int8 kernels + float32 scales).

    Works on numpy (host, e.g. at conversion) or jax arrays (on device, keeping each array's sharding
    for the kernel; the scale is placed by the caller's shardings when it puts the tree on a mesh)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for p, a in flat.items():
        spec = quantized_kernels({p: a}).get(p)
        if spec is None:
            out[p] = a
            continue
        if a.dtype == np.int8:
            raise ValueError(f"param {p!r} is already int8: the params are quantized already")
        quantize = _quantize_fused if isinstance(a, jax.Array) else quantize_array
        out[p], out[_scale_path(p)] = quantize(a, *spec)
    return traverse_util.unflatten_dict(out, sep="/")


def dequantize_params(params, dtype=np.float32) -> dict:
    """The inverse up to rounding: int8 kernels times their scales, in `dtype`; the scales go away."""
    flat = traverse_util.flatten_dict(params, sep="/")
    specs = quantized_kernels(flat)
    out = {}
    for p, a in flat.items():
        if p in specs and a.dtype == np.int8:
            out[p] = dequantize_array(a, flat[_scale_path(p)], *specs[p], dtype=dtype)
        elif not any(p == _scale_path(k) for k in specs):
            out[p] = a
    return traverse_util.unflatten_dict(out, sep="/")


def weight_bytes(params) -> int:
    """Bytes of all params (int8 kernels count one byte per weight)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def scale_paths(flat: dict) -> set:
    """The "/"-joined paths of the scales among `flat` (they stay float32 whatever the float dtype)."""
    return {_scale_path(p) for p in quantized_kernels(flat)} & set(flat)


# ---------------------------------------------------------------------------------------------
# --weights fp32 | bf16 | int8
# ---------------------------------------------------------------------------------------------
WEIGHTS = ("fp32", "bf16", "int8")
FLOAT_WEIGHTS = {"fp32": "float32", "bf16": "bfloat16"}


def check_weights(weights: str, name: str = "weights") -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"{name}={weights!r}: expected one of {', '.join(WEIGHTS)}")
    return weights


def weights_of(cfg) -> str:
    """What `cfg` runs: "int8" when quantized, else its param dtype as "fp32" / "bf16"."""
    if cfg.quantization == "int8":
        return "int8"
    return {v: k for k, v in FLOAT_WEIGHTS.items()}.get(cfg.param_dtype, cfg.param_dtype)


def convert_weights(cfg, params, weights: str):
    """(config, params) → the same model with `weights`: "int8" quantizes the LLM linears (compute dtype
    unchanged); "fp32" / "bf16" set the param and compute dtype, dequantizing an int8 model first."""
    check_weights(weights)
    if weights == "int8":
        if cfg.quantization == "int8":
            return cfg, params
        return cfg.replace(quantization="int8"), quantize_params(params)
    dtype = FLOAT_WEIGHTS[weights]
    if cfg.quantization == "int8":
        params = dequantize_params(params, dtype)
    params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype
                          else a, params)
    return cfg.replace(quantization="none", dtype=dtype, param_dtype=dtype), params
