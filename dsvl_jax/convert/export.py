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
from dsvl_jax.convert.safetensors_io import MAX_SHARD_BYTES, CheckpointError, write_checkpoint

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


def tensor_plan(cfg: VLMConfig, params, layout: str, dtype=None):
    """[(torch_key, shape, dtype)] in key-map order, and a `produce(key)` that builds one tensor."""
    flat = traverse_util.flatten_dict(params, sep="/")
    plan, by_key = [], {}
    for m in keymap.mappings(cfg, layout):
        missing = [p for p in m.ours if p not in flat]
        if missing:
            raise CheckpointError(f"params lack {missing} needed for {m.torch_key!r}")
        per_layer = [flat[p].shape[1:] if m.layer is not None else flat[p].shape for p in m.ours]
        shape = keymap.torch_shape(m.kind, per_layer, m.in_ndim, m.lead_ones)
        dt = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(flat[m.ours[0]].dtype)
        plan.append((m.torch_key, shape, dt))
        by_key[m.torch_key] = m

    dtypes = {k: d for k, _, d in plan}

    def produce(key):
        m = by_key[key]
        arrays = [sharding.host_array(flat[p][m.layer] if m.layer is not None else flat[p]) for p in m.ours]
        return keymap.to_torch(m.kind, arrays, m.in_ndim, m.lead_ones).astype(dtypes[key], copy=False)

    return plan, produce


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
    plan, produce = tensor_plan(cfg, params, layout, dtype)  # validates before anything is written
    dname = _dtype_name(plan)
    config = config_io.to_hf(cfg, dname) if layout == "hf" else config_io.to_official(cfg, dname)
    side_dir = side_files_from or source
    with atomic_directory(path, overwrite) as tmp:
        write_checkpoint(tmp, plan, produce, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if side_dir and os.path.isdir(side_dir):
            for name in SIDE_FILES:
                if os.path.isfile(os.path.join(side_dir, name)):
                    shutil.copy2(os.path.join(side_dir, name), os.path.join(tmp, name))
        for f_ in extra_files:
            shutil.copy2(f_, os.path.join(tmp, os.path.basename(f_)))
    return os.path.abspath(path)
