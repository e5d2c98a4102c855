"""A LoRA run's checkpoints keep the frozen base apart, so a save writes only what training changes.

    workdir/lora_base/                 Orbax PyTree {"params": the frozen base params (mask False)}: written
                                       once, by the run's first save (before that step's checkpoint), atomically
    workdir/checkpoints/<step>/state   the usual TrainState, except that "params" holds only the params trained
                                       in full (`lora.full`; {} by default) beside "lora", "opt_state" and counters

The frozen params never change during the run, so the base written at the first save is the base of every
later step; a resumed run reads it back and writes it no more. `convert.orbax_io.OrbaxSource` fills the params a
step's state lacks from `lora_base` (export, `load_orbax_params`, chat/eval, `init.from_checkpoint`). A LoRA
checkpoint that holds the full params (written before this split) still reads and resumes as before; a
checkpoint of a non-LoRA run is unchanged.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp
from flax import traverse_util

from dsvl_jax.convert.folders import LORA_BASE, OrbaxError


def base_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), LORA_BASE)


def split(state: dict, frozen_mask) -> tuple:
    """(the state a step checkpoint holds: params trained in full only, the frozen params) — both nested."""
    flat = traverse_util.flatten_dict(state["params"], sep="/")
    m = traverse_util.flatten_dict(frozen_mask, sep="/")
    trained = {k: v for k, v in flat.items() if m[k]}
    frozen = {k: v for k, v in flat.items() if not m[k]}
    # nested dicts: an empty "params" ({}) round-trips through Orbax as {}
    step_state = dict(state, params=traverse_util.unflatten_dict(trained, sep="/") if trained else {})
    return step_state, traverse_util.unflatten_dict(frozen, sep="/")


def join(step_state: dict, frozen) -> dict:
    """The whole state back from a step checkpoint's state and the base."""
    flat = traverse_util.flatten_dict(frozen, sep="/")
    flat.update(traverse_util.flatten_dict(step_state["params"], sep="/"))
    return dict(step_state, params=traverse_util.unflatten_dict(flat, sep="/"))


def save_base(workdir: str, frozen) -> None:
    """Write the frozen params to workdir/lora_base, synchronously (the step saved next relies on it), replacing
    a stale one; Orbax writes into a temporary folder and renames it, so a cut-off write leaves no base."""
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckpt:
        ckpt.save(base_dir(workdir), args=ocp.args.StandardSave({"params": frozen}), force=True)


def require_base(workdir: str) -> str:
    path = base_dir(workdir)
    if not os.path.isdir(path):
        raise OrbaxError(f"{path}: missing; a LoRA run's checkpoints hold only the trained params and read the "
                         f"frozen base from there")
    return path


def restore_base(workdir: str, abstract_frozen):
    """The frozen params from workdir/lora_base onto the shardings of `abstract_frozen`."""
    path = require_base(workdir)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckpt:
        return ckpt.restore(path, args=ocp.args.StandardRestore({"params": abstract_frozen}))["params"]


def base_shapes(workdir: str) -> dict:
    """{param path: shape} of workdir/lora_base from its metadata alone."""
    path = require_base(workdir)
    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree["params"], sep="/").items()}
