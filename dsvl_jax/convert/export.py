"""`save_pretrained`: our params → a PyTorch checkpoint folder (HF-port or official layout).

It runs the key map backwards, one tensor at a time (a streaming safetensors writer fixes the
header from the shapes first), into a temporary folder beside the destination that is renamed
into place only when everything is written: a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import config_io, keymap
from dsvl_jax.convert.safetensors_io import MAX_SHARD_BYTES, write_checkpoint
from dsvl_jax.errors import CheckpointError
from dsvl_jax.state import check_params

# Files beside the weights that travel with a checkpoint (tokenizer, processor, generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "preprocessor_config.json", "processor_config.json", "generation_config.json", "chat_template.jinja")


class DestinationExists(FileExistsError):
    pass


def _unpack(model):
    if isinstance(model, tuple) and len(model) == 2:
        return model[0], model[1], None
    cfg, params = getattr(model, "config", None), getattr(model, "params", None)
    if not isinstance(cfg, VLMConfig) or params is None:
        raise TypeError("save_pretrained takes what load_pretrained returns, or a (VLMConfig, params) pair")
    return cfg, params, getattr(model, "source", None)


class atomic_directory:
    """Context manager: yields a fresh temp folder beside `path`; on success it replaces `path`."""

    def __init__(self, path: str, overwrite: bool):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        if os.path.exists(self.path) and not self.overwrite:
            raise DestinationExists(f"{self.path} already exists (pass overwrite=True / --overwrite to replace it)")
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"parent folder {parent} of the destination does not exist")
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.partial-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.old-", dir=os.path.dirname(self.path))
            os.rename(self.path, os.path.join(old, "x"))
        os.rename(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


def plan_tensors(cfg: VLMConfig, layout: str, shape_of, dtype_of, array_of, dtype=None):
    """The key map run backwards, for any source of our params: [(torch_key, shape, dtype)] in key-map
    order, and `produce(key)` that builds that one tensor.

    shape_of(path) → our full shape, or None when the source lacks the param; dtype_of(path) → its dtype;
    array_of(path, layer) → our array (one layer of a stacked param when layer is not None)."""
    cfg = keymap.export_config(cfg, layout)
    fills = keymap.initial_values(cfg)
    fill_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
    plan, by_key = [], {}
    for m in keymap.mappings(cfg, layout):
        per_layer, dts = [], []
        for p in m.ours:
            shape = shape_of(p)
            if shape is None and p in fills:
                per_layer.append(fills[p][0])
                continue
            if shape is None:
                raise CheckpointError(f"params lack {p!r}, needed for {m.torch_key!r}")
            per_layer.append(tuple(shape[1:]) if m.layer is not None else tuple(shape))
            dts.append(np.dtype(dtype_of(p)))
        if fill_dtype is None and not dts:  # a filled tensor follows the vision tower's dtype
            dts.append(np.dtype(dtype_of("vision/siglip/norm/scale")))
        dt = fill_dtype if fill_dtype is not None else np.result_type(*dts)
        plan.append((m.torch_key, keymap.torch_shape(m.kind, per_layer, m.in_ndim, m.lead_ones), dt))
        by_key[m.torch_key] = (m, per_layer, dt)

    def produce(key):
        m, per_layer, dt = by_key[key]
        arrays = [np.full(s, fills[p][1], dt) if shape_of(p) is None else array_of(p, m.layer)
                  for p, s in zip(m.ours, per_layer)]
        return keymap.to_torch(m.kind, arrays, m.in_ndim, m.lead_ones).astype(dt, copy=False)

    return plan, produce


def tensor_plan(cfg: VLMConfig, params, layout: str, dtype=None):
    """`plan_tensors` over a (possibly sharded) param tree: one tensor gathered to the host at a time."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return plan_tensors(
        cfg, layout, lambda p: flat[p].shape if p in flat else None, lambda p: flat[p].dtype,
        lambda p, layer: sharding.host_array(flat[p][layer] if layer is not None else flat[p]), dtype)


def _dtype_name(plan) -> str:
    names = {np.dtype(d).name for _, _, d in plan}
    return names.pop() if len(names) == 1 else "float32"


def save_pretrained(model, path: str, layout: str = "hf", dtype=None, *, overwrite: bool = False,
                    max_shard_bytes: int = MAX_SHARD_BYTES, side_files_from: Optional[str] = None,
                    extra_files: Sequence[str] = ()) -> str:
    """Write `model` (a `VLM`, or a `(VLMConfig, params)` pair) as a PyTorch checkpoint folder.

    layout: "hf" (transformers `DeepseekVL(Hybrid)ForConditionalGeneration`) or "official" (deepseek-ai).
    dtype: None keeps each tensor's dtype (bf16 stays bf16); e.g. "bfloat16" converts.
    Tokenizer / processor files are copied from `side_files_from` (default: the folder the model was
    loaded from) and `extra_files`. Returns the destination path."""
    cfg, params, source = _unpack(model)
    if layout not in keymap.LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {keymap.LAYOUTS}")
    check_params(cfg, params)
    plan, produce = tensor_plan(cfg, params, layout, dtype)  # validates before anything is written
    return write_folder(path, cfg, layout, plan, produce, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                        side_files_from=side_files_from or source, extra_files=extra_files)


def write_folder(path: str, cfg: VLMConfig, layout: str, plan, produce, *, overwrite: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES, side_files_from: Optional[str] = None,
                 extra_files: Sequence[str] = ()) -> str:
    """config.json + safetensors (from `plan`/`produce`) + side files, atomically into `path`."""
    dname = _dtype_name(plan)
    config = config_io.to_hf(cfg, dname) if layout == "hf" else config_io.to_official(cfg, dname)
    with atomic_directory(path, overwrite) as tmp:
        write_checkpoint(tmp, plan, produce, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        copy_side_files(side_files_from, tmp)
        for f_ in extra_files:
            shutil.copy2(f_, os.path.join(tmp, os.path.basename(f_)))
    return os.path.abspath(path)


def copy_side_files(src_dir: Optional[str], dst_dir: str) -> list:
    """Copy the tokenizer / processor / generation files `src_dir` has into `dst_dir`; returns their names."""
    copied = []
    if src_dir and os.path.isdir(src_dir):
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
                copied.append(name)
    return copied
