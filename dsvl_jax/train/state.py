"""Training state: initialised directly sharded on the mesh (no host copy of the full model), from
scratch, from a previous stage's Orbax checkpoint or from a converted PyTorch checkpoint, re-initialising
only what the config names."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.models.vlm import DeepseekVL, abstract_params, dummy_inputs
from dsvl_jax.train.stages import path_matches
from dsvl_jax.train.step import split_params


def param_shardings(cfg: VLMConfig, mesh):
    """Nested NamedShardings of the params by the logical rules, and the abstract (unboxed) params."""
    boxed = abstract_params(cfg)
    return sharding.param_shardings(boxed, mesh), nn.meta.unbox(boxed)


def init_params(cfg: VLMConfig, mesh, seed: int):
    """Fresh params, each created on its shard (jit with out_shardings)."""
    shardings, _ = param_shardings(cfg, mesh)
    module = DeepseekVL(cfg)
    ids, images = dummy_inputs(cfg)

    def init(key):
        return nn.meta.unbox(module.init(key, ids, **images)["params"])

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


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


def make_state(params, tx, mask, mesh, cfg: VLMConfig):
    """{"step", "params", "opt_state", "bad_steps", "skipped"} with the optimizer state sharded like its params."""
    p_shard, _ = param_shardings(cfg, mesh)
    flat_shard = traverse_util.flatten_dict(p_shard, sep="/")
    trainable_abs, _ = split_params(jax.eval_shape(lambda: params), mask)
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    o_shard = opt_state_shardings(opt_abs, flat_shard, mesh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(lambda p: tx.init(split_params(p, mask)[0]), out_shardings=o_shard)(params)
    rep = NamedSharding(mesh, P())
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)
    return {"step": zero(), "params": params, "opt_state": opt_state, "bad_steps": zero(), "skipped": zero()}


def abstract_state(cfg: VLMConfig, mesh, tx, mask):
    """The state as ShapeDtypeStructs carrying this mesh's shardings: the restore target on resume, so a
    resumed run never spends time (or memory) initialising params it will overwrite."""
    p_shard, abstract = param_shardings(cfg, mesh)
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    params = jax.tree.map(with_sharding, abstract, p_shard)
    opt_abs = jax.eval_shape(tx.init, split_params(abstract, mask)[0])
    opt = jax.tree.map(with_sharding, opt_abs,
                       opt_state_shardings(opt_abs, traverse_util.flatten_dict(p_shard, sep="/"), mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return {"step": scalar, "params": params, "opt_state": opt, "bad_steps": scalar, "skipped": scalar}


def state_shardings(state, mesh):
    """The NamedSharding tree of a state (for restoring onto this mesh)."""
    return jax.tree.map(lambda x: x.sharding, state)


def reinit(params, fresh, patterns):
    """Take `fresh` values for every param whose path matches `patterns`; keep the others."""
    if not patterns:
        return params
    flat, new = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(fresh, sep="/")
    hit = [k for k in flat if path_matches(k, patterns)]
    if not hit:
        raise ValueError(f"init.reinit patterns {list(patterns)} match no parameter")
    for k in hit:
        flat[k] = new[k]
    return traverse_util.unflatten_dict(flat, sep="/")


def cast_like(params, abstract):
    """Cast loaded params to the dtypes of the abstract tree (e.g. fp32 master weights from a bf16 checkpoint)."""
    return jax.tree.map(lambda x, a: x.astype(a.dtype) if x.dtype != a.dtype else x, params, abstract)
