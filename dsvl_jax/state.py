"""The shape of the params and of the training state, from a `VLMConfig` alone: the layer that
`convert`, `train` and `generation` all build on (it imports only the model, the sharding rules and
the error types).

Params: `abstract_params` (the boxed tree as ShapeDtypeStructs, nothing allocated), `param_shapes`
(flat `{path: ShapeDtypeStruct}`), `check_params` (a tree against the config), `param_shardings` (by
the logical rules) and `init_params` (fresh, each param created on its shard).

Training state: one `TrainState`, a plain dict so that Orbax saves it as is and a converter can
restore `params` alone:

    {"step": int32, "params": full tree, "opt_state": optimizer state of the *trainable* params only,
     "bad_steps": consecutive non-finite steps, "skipped": total skipped updates}

`abstract_state` is its sharded ShapeDtypeStruct twin (the restore target on resume, the ahead-of-time
compile's input); `make_state` builds the real one on the same shardings.
"""
from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.errors import CheckpointError
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs


# ---------------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------------
def abstract_params(cfg: VLMConfig):
    """The boxed (LogicallyPartitioned) parameter tree as ShapeDtypeStructs, without allocating anything."""
    model = DeepseekVL(cfg)
    ids, images = dummy_inputs(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, **images))["params"]


def param_shapes(cfg: VLMConfig) -> dict:
    """{our param path: ShapeDtypeStruct} for `cfg`, from `jax.eval_shape` (nothing allocated)."""
    return traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)), sep="/")


def check_params(cfg: VLMConfig, params) -> None:
    """Raise `CheckpointError` unless `params` has exactly the paths and shapes `cfg` builds (dtypes may differ)."""
    want = param_shapes(cfg)
    have = traverse_util.flatten_dict(params, sep="/")
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(f"params do not fit the config: missing {missing[:4]}, unexpected {extra[:4]}")
    bad = [(p, tuple(have[p].shape), tuple(want[p].shape)) for p in want if tuple(have[p].shape) != tuple(want[p].shape)]
    if bad:
        p, got, need = bad[0]
        raise CheckpointError(f"params do not fit the config: {p!r} has shape {got}, the config needs {need} "
                              f"({len(bad)} mismatched)")


def param_shardings(cfg: VLMConfig, mesh):
    """Nested NamedShardings of the params by the logical rules, and the abstract (unboxed) params."""
    boxed = abstract_params(cfg)
    return sharding.param_shardings(boxed, mesh), nn.meta.unbox(boxed)


def init_params(cfg: VLMConfig, mesh, seed: int):
    """Fresh params, each created on its shard (jit with out_shardings): no host copy of the full model."""
    shardings, _ = param_shardings(cfg, mesh)
    module = DeepseekVL(cfg)
    ids, images = dummy_inputs(cfg)

    def init(key):
        return nn.meta.unbox(module.init(key, ids, **images)["params"])

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def adapter_shardings(cfg: VLMConfig, mesh, spec: lora.LoraSpec):
    """NamedShardings of the LoRA adapters of `spec` by the logical rules, and the abstract (unboxed) adapters."""
    ids, images = dummy_inputs(cfg)
    boxed = lora.abstract_adapters(DeepseekVL(cfg), spec, ids, **images)
    return sharding.param_shardings(boxed, mesh), nn.meta.unbox(boxed)


def init_adapters(cfg: VLMConfig, mesh, spec: lora.LoraSpec, seed: int):
    """Fresh adapters (A from `seed`, B zero), each created on its shard."""
    shardings, _ = adapter_shardings(cfg, mesh, spec)
    module = DeepseekVL(cfg)
    ids, images = dummy_inputs(cfg)
    with jax.set_mesh(mesh):
        return jax.jit(lambda key: lora.init_adapters(module, spec, key, ids, **images),
                       out_shardings=shardings)(jax.random.key(seed))


def cast_like(params, abstract):
    """Cast loaded params to the dtypes of the abstract tree (e.g. fp32 master weights from a bf16 checkpoint)."""
    return jax.tree.map(lambda x, a: x.astype(a.dtype) if x.dtype != a.dtype else x, params, abstract)


# ---------------------------------------------------------------------------------------------
# the training state
# ---------------------------------------------------------------------------------------------
class TrainState(TypedDict):
    """What the train step takes and returns, and what a training checkpoint's `state` item holds (a LoRA run's
    steps hold only the params it trains; its frozen base is saved once apart: `train/lora_checkpoint`)."""

    step: jax.Array  # int32 scalar: steps taken
    params: dict  # the full param tree, frozen params included
    opt_state: Any  # the optimizer state of the trainable params (a flat {path: array} tree inside)
    bad_steps: jax.Array  # int32 scalar: consecutive non-finite steps
    skipped: jax.Array  # int32 scalar: updates skipped as non-finite, in all
    lora: NotRequired[dict]  # a LoRA run's adapters (`models/lora.py`), apart from the params; trained


def split_params(params, mask):
    """(trainable flat dict, frozen flat dict) by the bool mask tree: the optimizer sees the first only."""
    flat = traverse_util.flatten_dict(params, sep="/")
    m = traverse_util.flatten_dict(mask, sep="/")
    return {k: v for k, v in flat.items() if m[k]}, {k: v for k, v in flat.items() if not m[k]}


def merge_params(trainable, frozen):
    return traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")


def opt_state_shardings(abstract_opt_state, flat_param_shardings, mesh):
    """Each optimizer leaf (Adam mu/nu) takes the sharding of the param whose flat key is in its path."""
    rep = NamedSharding(mesh, P())

    def pick(path, leaf):
        for k in path:
            key = getattr(k, "key", None)
            if isinstance(key, str) and key in flat_param_shardings:
                s = flat_param_shardings[key]
                return s if len(leaf.shape) >= len(s.spec) else rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def trained_params(params, mask, adapters=None) -> dict:
    """The flat {path: array} tree the optimizer sees: the masked params, and a LoRA run's adapters."""
    trainable = split_params(params, mask)[0]
    if adapters is not None:
        trainable.update(traverse_util.flatten_dict(adapters, sep="/"))
    return trainable


def abstract_state(cfg: VLMConfig, mesh, tx, mask, lora_spec: lora.LoraSpec | None = None) -> TrainState:
    """The state as ShapeDtypeStructs carrying this mesh's shardings, nothing allocated: the restore target
    on resume (a resumed run never initialises params it will overwrite) and the AOT compile's input.
    With `lora_spec`, the state also holds the adapters ("lora"), trained with the masked params."""
    p_shard, abstract = param_shardings(cfg, mesh)
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    flat_shard = traverse_util.flatten_dict(p_shard, sep="/")
    adapters = None
    if lora_spec is not None:
        a_shard, adapters = adapter_shardings(cfg, mesh, lora_spec)
        flat_shard.update(traverse_util.flatten_dict(a_shard, sep="/"))
    opt_abs = jax.eval_shape(tx.init, trained_params(abstract, mask, adapters))
    o_shard = opt_state_shardings(opt_abs, flat_shard, mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    state = TrainState(step=scalar, params=jax.tree.map(with_sharding, abstract, p_shard),
                       opt_state=jax.tree.map(with_sharding, opt_abs, o_shard), bad_steps=scalar, skipped=scalar)
    if adapters is not None:
        state["lora"] = jax.tree.map(with_sharding, adapters, a_shard)
    return state


def make_state(params, tx, mask, mesh, cfg: VLMConfig, adapters=None, lora_spec: lora.LoraSpec | None = None
               ) -> TrainState:
    """A fresh state around `params` (and a LoRA run's `adapters` of `lora_spec`), already placed, on the
    shardings of `abstract_state`."""
    target = abstract_state(cfg, mesh, tx, mask, lora_spec)
    o_shard = jax.tree.map(lambda a: a.sharding, target["opt_state"])
    with jax.set_mesh(mesh):
        opt_state = jax.jit(lambda p, a: tx.init(trained_params(p, mask, a)), out_shardings=o_shard)(params, adapters)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), target["step"].sharding)  # noqa: E731
    state = TrainState(step=zero(), params=params, opt_state=opt_state, bad_steps=zero(), skipped=zero())
    if adapters is not None:
        state["lora"] = adapters
    return state
