"""The Orbax training-checkpoint contract, and reading / writing the params of such checkpoints.

A training workdir looks like this (the trainer writes it through `checkpoint_manager`):

    workdir/model_config.json            VLMConfig.to_dict()  (or checkpoints/config.json, same format)
    workdir/checkpoints/<step>/state     ocp.args.StandardSave(a `dsvl_jax.state.TrainState`: step, params, ...)
    workdir/checkpoints/<step>/data      the Grain iterator state (never read here)
    workdir/lora_base                    a LoRA run's frozen base params ({"params": ...}), written once; its
                                         steps' `state` holds only the params it trains (`train/lora_checkpoint`)

Conversion reads **params only** (partial restore: optimizer state is neither needed nor loaded), as
numpy arrays on the host, whatever mesh the checkpoint was saved from. Written checkpoints have a
`state` item with step and params only; tokenizer / processor files sit beside model_config.json.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import export
# The folder contract lives in `folders` (jax-free); its names are part of this module's interface too.
from dsvl_jax.convert.folders import (  # noqa: F401
    ALT_CONFIG, CHECKPOINTS_DIR, DATA, ITEM_NAMES, LORA_BASE, MODEL_CONFIG, STATE, Location, OrbaxError, is_orbax, locate,
    read_model_config)
from dsvl_jax.models.quant import scale_paths
from dsvl_jax.state import check_params, param_shapes


# ---------------------------------------------------------------------------------------------
# the contract, for the trainer
# ---------------------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, options=None):
    """`ocp.CheckpointManager(workdir/checkpoints, item_names=("state", "data"))`."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR), item_names=ITEM_NAMES,
                                 options=options)


def train_state(step: int, params, opt_state=None) -> dict:
    """The `state` item a converter writes: the "step" and "params" of a `TrainState` (plus "opt_state"
    when given); a reader of training checkpoints needs no more."""
    state = {"step": np.asarray(step, np.int32), "params": params}
    if opt_state is not None:
        state["opt_state"] = opt_state
    return state


def write_model_config(workdir: str, cfg: VLMConfig) -> str:
    path = os.path.join(workdir, MODEL_CONFIG)
    with open(path + ".tmp", "w") as f:  # then renamed: a process killed mid-write leaves the old file intact
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------------------------
# params in and out
# ---------------------------------------------------------------------------------------------
def _quiet_orbax():
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # Orbax warns about metadata files it does not need


class OrbaxSource:
    """The params of one step of an Orbax checkpoint, checked against its model config up front (from
    the metadata alone) and restored onto the host as numpy arrays, whatever mesh they were saved from.

    Partial restores only: the optimizer state is never read. A checkpoint whose params exceed
    `resident_bytes` is restored one param at a time as an export asks for them (a few recent ones
    cached, for fused PyTorch tensors), so converting it never holds the whole model; smaller ones are
    restored in one call."""

    def __init__(self, path: str, step: Optional[int] = None, *, resident_bytes: int = 2**30):
        import orbax.checkpoint as ocp
        _quiet_orbax()
        self.location = loc = locate(path, step)
        self.config = cfg = read_model_config(loc.config_path)
        self.state_dir = state_dir = os.path.join(loc.step_dir, STATE)
        if not os.path.isdir(state_dir):
            raise OrbaxError(f"{loc.step_dir}: no '{STATE}' item, so no params "
                             f"(found {sorted(os.listdir(loc.step_dir))})")
        self._ckpt = ocp.PyTreeCheckpointer()
        try:
            meta = self._ckpt.metadata(state_dir)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        except Exception as e:  # Orbax raises a variety of types for unreadable folders
            raise OrbaxError(f"{state_dir}: unreadable Orbax metadata ({type(e).__name__}: {e})") from None
        if not isinstance(tree, dict) or "params" not in tree:
            keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise OrbaxError(f"{state_dir}: the Orbax state has no 'params' (it holds {keys})")
        self._meta = have = traverse_util.flatten_dict(tree["params"], sep="/")
        self._dir_of = dict.fromkeys(have, state_dir)  # where each param is read from
        want = param_shapes(cfg)
        if "lora" in tree and set(want) - set(have):  # a LoRA run: the frozen base is apart, written once
            self._add_lora_base(os.path.join(os.path.dirname(loc.config_path), LORA_BASE))
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            raise OrbaxError(f"{state_dir}: params do not match {loc.config_path}: missing {missing[:4]}, "
                             f"unexpected {extra[:4]}")
        for p, sds in want.items():
            if tuple(have[p].shape) != tuple(sds.shape):
                raise OrbaxError(f"{state_dir}: param {p!r} has shape {tuple(have[p].shape)}; {loc.config_path} "
                                 f"needs {tuple(sds.shape)}")
        total = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in have.values())
        self._whole = self._restore(list(have)) if total <= resident_bytes else None
        self._cache: dict = {}  # path → array, insertion order = recency
        self._cache_bytes = min(resident_bytes, 2**29)

    def _add_lora_base(self, base_dir: str):
        """The params a LoRA run's step lacks, from its `lora_base` (metadata only here)."""
        if not os.path.isdir(base_dir):
            raise OrbaxError(f"{self.state_dir}: a LoRA run's checkpoint holds only its trained params, and the "
                             f"frozen base they need, {base_dir}, is missing")
        try:
            meta = self._ckpt.metadata(base_dir)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            base = traverse_util.flatten_dict(tree["params"], sep="/")
        except Exception as e:  # Orbax raises a variety of types for unreadable folders
            raise OrbaxError(f"{base_dir}: unreadable Orbax metadata ({type(e).__name__}: {e})") from None
        for p, m in base.items():
            if p not in self._meta:
                self._meta[p], self._dir_of[p] = m, base_dir

    def _restore(self, paths: list) -> dict:
        out = {}
        for folder in dict.fromkeys(self._dir_of[p] for p in paths):  # the step's state, then a LoRA base
            out.update(self._restore_from(folder, [p for p in paths if self._dir_of[p] == folder]))
        return out

    def _restore_from(self, folder: str, paths: list) -> dict:
        import orbax.checkpoint as ocp
        item = {"params": traverse_util.unflatten_dict({p: np.empty((0,), self._meta[p].dtype) for p in paths},
                                                       sep="/")}
        args = {"params": traverse_util.unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths},
                                                       sep="/")}
        previous = _drop_closed_loop_noise()  # from before the first read: the noise can outrun the error
        try:
            out = self._ckpt.restore(folder, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                         partial_restore=True))
        except (ValueError, OSError) as e:  # how tensorstore reports a data file missing or cut short
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OrbaxError(f"{folder}: damaged Orbax checkpoint: a data file is missing or truncated "
                             f"({first})") from None
        sys.unraisablehook = previous  # a restore that worked leaves no reads behind
        return traverse_util.flatten_dict(out["params"], sep="/")

    # -- the three callbacks of export.plan_tensors --
    def shape_of(self, p: str):
        return tuple(self._meta[p].shape) if p in self._meta else None

    def dtype_of(self, p: str) -> np.dtype:
        return np.dtype(self._meta[p].dtype)

    def array_of(self, p: str, layer) -> np.ndarray:
        arr = self.get(p)
        return arr if layer is None else arr[layer]

    def get(self, p: str) -> np.ndarray:
        if self._whole is not None:
            return self._whole[p]
        if p in self._cache:
            self._cache[p] = self._cache.pop(p)  # most recent last
        else:
            self._cache[p] = self._restore([p])[p]
            while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self._cache_bytes:
                del self._cache[next(iter(self._cache))]
        return self._cache[p]

    def params(self, dtype=None) -> dict:
        """All params as a nested numpy dict (`dtype` casts the float params; int8 kernels and their
        float32 scales of a quantized checkpoint stay as they are)."""
        flat = self._whole if self._whole is not None else self._restore(list(self._meta))
        if dtype is not None:
            target, keep = np.dtype(jnp.dtype(dtype)), scale_paths(flat)
            flat = {p: a if p in keep or not np.issubdtype(a.dtype, np.floating) else a.astype(target, copy=False)
                    for p, a in flat.items()}
        return traverse_util.unflatten_dict(flat, sep="/")


def _is_closed_loop_noise(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_noise():
    """After a failed restore, the reads still in flight finish on tensorstore threads and call back into
    Orbax's event loop, which is closed by then: each prints an "Event loop is closed" traceback (an
    unraisable exception), seconds after the error was reported. Those, and only those, are dropped from
    now on; returns the hook to put back when the restore worked."""
    hook = sys.unraisablehook
    if getattr(hook, "_dsvl_filter", False):
        return hook

    def filtered(unraisable):
        if not _is_closed_loop_noise(unraisable):
            hook(unraisable)

    filtered._dsvl_filter = True
    sys.unraisablehook = filtered
    return hook


def load_orbax_params(path: str, step: Optional[int] = None, dtype=None) -> tuple:
    """(VLMConfig, params as nested numpy arrays) from a training workdir / checkpoints dir / step dir
    (latest step unless `step`): params only, onto the host, whatever mesh they were saved from."""
    source = OrbaxSource(path, step)
    return source.config, source.params(dtype)


def _lean_state_handler():
    """Writes the same format as the trainer's StandardSave, with the host memory a converter wants:
    numpy params are written in place (Orbax deep-copies them by default) and uncompressed (compressing
    into OCDBT buffered ~0.8x the checkpoint; bf16 weights shrink only ~30% anyway)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (np.number, th.ScalarHandler()),
        (int, th.ScalarHandler()), (float, th.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=1, use_compression=False)


def save_orbax_params(path: str, cfg: VLMConfig, params, step: int = 0, *, overwrite: bool = False,
                      side_files_from: Optional[str] = None) -> str:
    """Write a workdir holding model_config.json and checkpoints/<step>/state = {step, params}, atomically
    (a temporary folder beside `path`, renamed at the end). `checkpoint_manager(path)` and
    `load_orbax_params(path)` read it back. Returns the workdir path."""
    import orbax.checkpoint as ocp
    _quiet_orbax()
    check_params(cfg, params)
    params = jax.tree.map(sharding.host_array, params)  # numpy leaves: written as they are, no device copy
    with export.atomic_directory(path, overwrite) as tmp:
        write_model_config(tmp, cfg)
        mngr = ocp.CheckpointManager(os.path.join(tmp, CHECKPOINTS_DIR), item_handlers={STATE: _lean_state_handler()},
                                     options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
        try:
            mngr.save(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(train_state(step, params))}))
            mngr.wait_until_finished()
        finally:
            mngr.close()
        export.copy_side_files(side_files_from, tmp)
    return os.path.abspath(path)
