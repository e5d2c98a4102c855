"""LoRA: low-rank adapters on the model's dense layers, without touching the model code.

A targeted `nn.DenseGeneral` (kernel W, input dims I…, output dims O…) computes

    y = x·W (+ b) + (alpha / rank) · (dropout(x)·A)·B,   A: [I…, rank] (seeded), B: [rank, O…] (zeros)

so an untrained adapter (B = 0) adds exactly zero: the forward equals the base model's. The adapters are
params of their own, `<dense path>/lora_a` and `<dense path>/lora_b` beside the dense layer's `kernel`, created
by a flax method interceptor (`nn.intercept_methods`) around the ordinary model: scanned layers get stacked
adapters (leading "layers" axis) like their kernels, and the logical axis names follow the kernel's (A takes
the input axes, B the output axes; the rank axis is replicated), so the sharding rules place them.

Targets are path patterns over the dense layers' paths (the kernel path without `/kernel`), in the language
of `train.stages` (prefixes or `re:` regexes), or the group names of `TARGET_GROUPS`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax.train.stages import path_matches

A_NAME, B_NAME = "lora_a", "lora_b"

# Named target sets (dense-layer path patterns). The MAP head of SigLIP is never run, so never targeted.
TARGET_GROUPS = {
    "llm_attn": (r"re:^language_model/layers/self_attn/(q|k|v|o)_proj$",),
    "llm_mlp": (r"re:^language_model/layers/(gate|up|down)_proj$",),
    "siglip_attn": (r"re:^vision/siglip/blocks/(q|k|v|proj)$",),
    "siglip_mlp": (r"re:^vision/siglip/blocks/fc(1|2)$",),
    "adaptor": ("aligner/",),
}
TARGET_GROUPS["llm"] = TARGET_GROUPS["llm_attn"] + TARGET_GROUPS["llm_mlp"]
NEVER = ("vision/siglip/head/",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (the update is scaled by alpha / r, as peft does), dropout on the adapter's input,
    targets: group names (`TARGET_GROUPS`), dense-layer path prefixes or `re:` regexes."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = ("llm",)

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank <= 0:
            raise ValueError(f"lora.rank={self.rank!r}: expected a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r}: expected a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one group or dense-layer path")
        for t in self.targets:
            if t not in TARGET_GROUPS and "/" not in t and not t.startswith("re:"):
                raise ValueError(f"lora.targets entry {t!r}: expected one of {sorted(TARGET_GROUPS)}, a dense-layer "
                                 f"path prefix (with '/') or an 're:' regex")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def patterns(self) -> tuple:
        out = []
        for t in self.targets:
            out.extend(TARGET_GROUPS.get(t, (t,)))
        return tuple(out)

    def targets_layer(self, path: str) -> bool:
        return path_matches(path, self.patterns) and not path_matches(path, NEVER)


def _n_in(module: nn.DenseGeneral) -> int:
    return len(module.axis) if isinstance(module.axis, (tuple, list)) else 1


def _in_axes(module: nn.DenseGeneral, ndim: int) -> tuple:
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return tuple(a % ndim for a in axes)


def _adapter_params(module: nn.DenseGeneral, path: str, rank: int):
    """(A, B) of this layer: created at init (names and shapes from the layer's boxed kernel), read after."""
    if not module.is_initializing():
        if not (module.has_variable("params", A_NAME) and module.has_variable("params", B_NAME)):
            raise ValueError(f"LoRA adapters lack {path}/{A_NAME} or /{B_NAME}: the adapters do not fit the targets")
        return (nn.meta.unbox(module.get_variable("params", A_NAME)),
                nn.meta.unbox(module.get_variable("params", B_NAME)))
    kernel = module.scope.get_variable("params", "kernel")
    names = tuple(kernel.names) if isinstance(kernel, nn.LogicallyPartitioned) else (None,) * kernel.ndim
    shape = (kernel.value if isinstance(kernel, nn.LogicallyPartitioned) else kernel).shape
    n = _n_in(module)
    # peft's default A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n)), out_axis=-1)
    a = module.param(A_NAME, nn.with_logical_partitioning(a_init, names[:n] + (None,)), shape[:n] + (rank,),
                     module.param_dtype)
    b = module.param(B_NAME, nn.with_logical_partitioning(nn.initializers.zeros, (None,) + names[n:]),
                     (rank,) + shape[n:], module.param_dtype)
    return a, b


def interceptor(spec: LoraSpec, dropout: bool):
    """The method interceptor that adds the LoRA path to every targeted dense layer; `dropout` turns on the
    adapter-input dropout (needs a "dropout" rng in the apply)."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.DenseGeneral):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if not spec.targets_layer(path):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        a, b = _adapter_params(module, path, spec.rank)
        x = args[0] if args else kwargs["inputs"]
        dt = y.dtype
        x = x.astype(dt)
        if dropout and spec.dropout > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0.0).astype(dt)
        axes = _in_axes(module, x.ndim)
        h = jax.lax.dot_general(x, a.astype(dt), ((axes, tuple(range(len(axes)))), ((), ())))
        delta = jax.lax.dot_general(h, b.astype(dt), (((h.ndim - 1,), (0,)), ((), ())))
        return y + (delta * jnp.asarray(spec.scale, dt)).astype(dt)

    return intercept


def is_adapter_path(path: str) -> bool:
    return path.endswith("/" + A_NAME) or path.endswith("/" + B_NAME)


def split_adapters(flat: dict) -> tuple:
    """A flat {path: value} tree → (base entries, adapter entries)."""
    return ({k: v for k, v in flat.items() if not is_adapter_path(k)},
            {k: v for k, v in flat.items() if is_adapter_path(k)})


def with_adapters(params, adapters):
    """The params tree the model applies: base params and adapter params side by side."""
    if not adapters:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update(traverse_util.flatten_dict(adapters, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def apply(module: nn.Module, params, adapters, *args, spec: LoraSpec, rng=None, **kwargs):
    """`module.apply({"params": params + adapters}, *args, **kwargs)` with the LoRA path; `rng` (a key) turns
    on the adapter dropout (training)."""
    rngs = {"dropout": rng} if rng is not None and spec.dropout > 0 else None
    with nn.intercept_methods(interceptor(spec, dropout=rngs is not None)):
        return module.apply({"params": with_adapters(params, adapters)}, *args, rngs=rngs, **kwargs)


def abstract_adapters(module: nn.Module, spec: LoraSpec, *init_args, **init_kwargs):
    """The boxed adapter tree as ShapeDtypeStructs (logical names included), nothing allocated."""
    def init():
        with nn.intercept_methods(interceptor(spec, dropout=False)):
            variables = module.init(jax.random.key(0), *init_args, **init_kwargs)
        return adapters_of(variables["params"])
    out = jax.eval_shape(init)
    if not traverse_util.flatten_dict(out):
        raise ValueError(f"lora.targets {list(spec.targets)} match no dense layer of the model")
    return out


def adapters_of(params):
    """The adapter entries of a (possibly boxed) params tree, as a nested tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_adapter_path(k)}, sep="/")


def init_adapters(module: nn.Module, spec: LoraSpec, key, *init_args, **init_kwargs):
    """Fresh adapters (unboxed): A seeded by `key`, B zero. Under jit only the adapters' init survives (the base
    params the init also builds are dead code)."""
    with nn.intercept_methods(interceptor(spec, dropout=False)):
        variables = module.init(key, *init_args, **init_kwargs)
    return nn.meta.unbox(adapters_of(variables["params"]))


def delta(a, b, scale: float, kernel_shape: tuple):
    """scale·A·B in the layout of the kernel it updates, `kernel_shape` = [(layers,) I…, O…] (numpy or jax)."""
    xp = jnp if isinstance(a, jax.Array) else np
    stacked = (a.ndim - 1) + (b.ndim - 1) > len(kernel_shape)
    lead = tuple(a.shape[:1]) if stacked else ()
    r = a.shape[-1]
    d = xp.matmul(a.reshape(lead + (-1, r)), b.reshape(lead + (r, -1))) * scale
    return d.reshape(tuple(kernel_shape)).astype(a.dtype)


def layer_paths(adapters) -> list:
    """The dense-layer paths that carry an adapter, sorted."""
    flat = traverse_util.flatten_dict(adapters, sep="/")
    return sorted(k[:-len(A_NAME) - 1] for k in flat if k.endswith("/" + A_NAME))


def merge(params, adapters, spec: LoraSpec):
    """The base params with each adapted kernel replaced by W + scale·A·B (for inference, benchmarks and the
    merged export): one tree the plain model runs, equal to the LoRA forward up to float rounding."""
    flat = traverse_util.flatten_dict(params, sep="/")
    ad = traverse_util.flatten_dict(adapters, sep="/")
    for layer in layer_paths(adapters):
        w = flat[f"{layer}/kernel"]
        flat[f"{layer}/kernel"] = w + delta(ad[f"{layer}/{A_NAME}"], ad[f"{layer}/{B_NAME}"], spec.scale,
                                            w.shape).astype(w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
