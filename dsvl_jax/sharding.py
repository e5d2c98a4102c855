"""Logical axis names → device mesh: the rules table, mesh construction and parameter shardings.

Every parameter and the main activations carry logical axis names (see `models/`); this table maps
them onto a 3-axis mesh (`data`, `fsdp`, `tensor`), so that changing the parallelism is a config
change, not a model rewrite. Across several slices (`slices` > 1) the same three axes stay: the `data`
axis spans the slices over DCN (slice-major), while fsdp and tensor stay inside a slice on ICI, so the
rules table is unchanged and only the data-parallel gradient reduction crosses DCN. A dimension that does not divide its mesh axes is replicated instead
(tiny test models have 2 heads; a 1024-wide SigLIP on 3 tensor shards would not divide).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Weights: fsdp shards the model width, tensor the heads / MLP / vocab.
LOGICAL_RULES: tuple = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # language model weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # vision weights
    ("vis_embed", "fsdp"),
    ("vis_mlp", "tensor"),
    ("vis_heads", "tensor"),
    ("vis_pos", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("conv_kernel", None),
)


def _resolve_sizes(data, fsdp, tensor, n: int, where: str) -> list[int]:
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) does not divide {n} devices{where}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                         f"does not match the {n} available devices{where}")
    return sizes


def slice_groups(devices: Sequence[Any], slices: int) -> tuple[list[list[Any]], str]:
    """The devices split into `slices` slices, and by what: "slice" (TPU `slice_index`), "process" (one
    process a slice: the CPU multi-process test) or "order" (one process simulating slices, in device order)."""
    procs = sorted({d.process_index for d in devices})
    if all(hasattr(d, "slice_index") for d in devices):
        keys = sorted({d.slice_index for d in devices})
        if len(keys) == slices:
            return [[d for d in devices if d.slice_index == k] for k in keys], "slice"
        # CPU devices under jax.distributed all report slice_index 0: there, one process a slice (the CPU test)
        if not (devices[0].platform == "cpu" and len(keys) == 1 and len(procs) == slices):
            raise ValueError(f"mesh slices={slices}: the {len(devices)} devices are in {len(keys)} slice(s)")
    if len(procs) == slices:
        return [[d for d in devices if d.process_index == k] for k in procs], "process"
    if len(procs) > 1:
        raise ValueError(f"mesh slices={slices}: devices without slice_index in {len(procs)} processes "
                         f"(one process a slice is the only fallback)")
    per = len(devices) // slices
    return [list(devices[i * per:(i + 1) * per]) for i in range(slices)], "order"


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None,
              slices: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes; one size may be -1 (= the devices left over).

    slices > 1: the sizes are per slice and the mesh's data axis is slices x data, slice-major, built with
    `mesh_utils.create_hybrid_device_mesh` (DCN between slices, ICI inside one)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(slices, int) or slices < 1:
        raise ValueError(f"mesh slices={slices!r}: must be a positive integer")
    if slices == 1:
        sizes = _resolve_sizes(data, fsdp, tensor, len(devices), "")
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    if len(devices) % slices:
        raise ValueError(f"mesh slices={slices} does not divide the {len(devices)} devices")
    groups, by = slice_groups(devices, slices)
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"mesh slices={slices}: the slices hold unequal device counts {[len(g) for g in groups]}")
    sizes = _resolve_sizes(data, fsdp, tensor, len(groups[0]), f" of one slice (of {slices})")
    flat = [d for g in groups for d in g]
    if by == "slice":
        grid = mesh_utils.create_hybrid_device_mesh(sizes, (slices, 1, 1), flat)
    elif by == "process":
        grid = mesh_utils.create_hybrid_device_mesh(sizes, (slices, 1, 1), flat, process_is_granule=True)
    else:  # one process simulating slices (tests): each slice's devices in order
        grid = np.concatenate([np.array(g, dtype=object).reshape(sizes) for g in groups], axis=0)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_slice_of(mesh: Mesh, slices: int) -> np.ndarray:
    """For each device of `mesh` in its flat (partition id) order, the slice it belongs to (data is slice-major)."""
    data = mesh.shape["data"]
    if data % slices:
        raise ValueError(f"mesh data axis {data} is not a multiple of slices={slices}")
    idx = np.indices(mesh.devices.shape)[0] // (data // slices)
    return idx.reshape(-1)


def _mesh_axes_for(name, rules):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise ValueError(f"logical axis {name!r} has no rule in the sharding table")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """PartitionSpec for one array; dims that do not divide their mesh axes stay replicated."""
    out, used = [], set()
    for name, dim in zip(names, shape):
        axes = None if name is None else _mesh_axes_for(name, rules)
        if axes is not None:
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
            if not axes or dim % math.prod(mesh.shape[a] for a in axes):
                axes = None
        if axes:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly abstract) `nn.LogicallyPartitioned` params."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            shape = x.value.shape
            return NamedSharding(mesh, logical_to_spec(x.names, shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_names(boxed_params):
    """The tree of logical axis-name tuples (None for unboxed leaves)."""
    return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None,
                        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(shardings) -> dict:
    """{path: spec string}: handy in tests and logs."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(k): str(v.spec) for k, v in flat}


def host_array(x) -> np.ndarray:
    """Gather a (possibly sharded, possibly multi-host) array to a numpy array on this host."""
    from jax.experimental import multihost_utils
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
