"""`save_pretrained`: our params → a PyTorch checkpoint folder (HF-port or official layout).

It runs the key map backwards, one tensor at a time (a streaming safetensors writer fixes the
header from the shapes first), into a temporary folder beside the destination that is renamed
into place only when everything is written: a crash never leaves a half-written checkpoint. An HF-port
folder is complete: weights, config, tokenizer files, processor config and chat template, so
transformers' `AutoProcessor` and `AutoModelForImageTextToText` load it as it is.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import config_io, keymap
from dsvl_jax.convert.safetensors_io import MAX_SHARD_BYTES, write_checkpoint
from dsvl_jax.errors import CheckpointError
from dsvl_jax.models.quant import convert_weights
from dsvl_jax.processing.chat import CHAT_TEMPLATE, IMAGE_TAG
from dsvl_jax.processing.processor import write_hf_processor_config
from dsvl_jax.state import check_params

# Files beside the weights that travel with a checkpoint (tokenizer, processor, generation settings).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # each layout has its own format
SIDE_FILES = TOKENIZER_FILES + PROCESSOR_FILES + ("generation_config.json", "chat_template.jinja")


class DestinationExists(FileExistsError):
    pass


def _unpack(model):
    if isinstance(model, tuple) and len(model) == 2:
        return model[0], model[1], None
    cfg, params = getattr(model, "config", None), getattr(model, "params", None)
    if not isinstance(cfg, VLMConfig) or params is None:
        raise TypeError("save_pretrained takes what load_pretrained returns, or a (VLMConfig, params) pair")
    return cfg, params, getattr(model, "source", None)


def _make_private_dir(parent: str, prefix: str) -> str:
    """A fresh folder under `parent`, created with the process umask (mkdtemp would force 0700, and the
    finished checkpoint is this very folder renamed)."""
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder in {parent}")


class atomic_directory:
    """Context manager: yields a fresh temp folder beside `path`; on success it replaces `path`.

    Missing parent folders are created (and removed again if the write fails); every folder gets the
    permissions the umask gives, as `mkdir -p` would."""

    def __init__(self, path: str, overwrite: bool):
        self.path = os.path.abspath(path)
        self.overwrite = overwrite

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        if os.path.exists(self.path) and not self.overwrite:
            raise DestinationExists(f"{self.path} already exists (pass overwrite=True / --overwrite to replace it)")
        self.created = []  # parents this write made, innermost first
        p = parent
        while not os.path.isdir(p):
            if os.path.exists(p):
                raise NotADirectoryError(f"{p} is a file, so it cannot hold the destination {self.path}")
            self.created.append(p)
            p = os.path.dirname(p)
        os.makedirs(parent, exist_ok=True)
        self.tmp = _make_private_dir(parent, f".{os.path.basename(self.path)}.partial-")
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for p in self.created:
                with contextlib.suppress(OSError):
                    os.rmdir(p)  # only when still empty
            return False
        old = None
        if os.path.exists(self.path):
            old = _make_private_dir(os.path.dirname(self.path), f".{os.path.basename(self.path)}.old-")
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


def dequantized(cfg: VLMConfig, params, dtype=None):
    """(cfg, params) unchanged when not quantized; else dequantized to `dtype` (default float32)."""
    if cfg.quantization != "int8":
        return cfg, params
    return convert_weights(cfg, params, "bf16" if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 else "fp32")


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
    loaded from) and `extra_files`; an "hf" folder also gets what `AutoProcessor` needs
    (`complete_hf_folder`). An int8-quantized model is written dequantized (q * scale) in `dtype`
    (default float32): PyTorch layouts have no int8 format here. Returns the destination path."""
    cfg, params, source = _unpack(model)
    if layout not in keymap.LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {keymap.LAYOUTS}")
    check_params(cfg, params)
    cfg, params = dequantized(cfg, params, dtype)
    plan, produce = tensor_plan(cfg, params, layout, dtype)  # validates before anything is written
    return write_folder(path, cfg, layout, plan, produce, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                        side_files_from=side_files_from or source, extra_files=extra_files)


def write_folder(path: str, cfg: VLMConfig, layout: str, plan, produce, *, overwrite: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES, side_files_from: Optional[str] = None,
                 extra_files: Sequence[str] = ()) -> str:
    """config.json + safetensors (from `plan`/`produce`) + side files (+ the HF processor files for "hf"),
    atomically into `path`."""
    dname = _dtype_name(plan)
    config = config_io.to_hf(cfg, dname) if layout == "hf" else config_io.to_official(cfg, dname)
    with atomic_directory(path, overwrite) as tmp:
        write_checkpoint(tmp, plan, produce, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        copy_side_files(side_files_from, tmp, layout)
        for f_ in extra_files:
            shutil.copyfile(f_, os.path.join(tmp, os.path.basename(f_)))
        if layout == "hf":
            complete_hf_folder(tmp, cfg)
    return os.path.abspath(path)


def processor_format(path: str) -> Optional[str]:
    """"hf" (transformers' DeepseekVL processors) or "official" (VLChatProcessor / VLMImageProcessor) for a
    processor / preprocessor config file; None when it is neither or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict):
        return None
    nested = d.get("image_processor") if isinstance(d.get("image_processor"), dict) else {}
    names = [str(x) for x in (d.get("processor_class"), d.get("image_processor_type"),
                              nested.get("image_processor_type")) if x]
    if any(n.startswith("DeepseekVL") for n in names):
        return "hf"
    if any(n in ("VLChatProcessor", "VLMImageProcessor") for n in names):
        return "official"
    return None


def copy_side_files(src_dir: Optional[str], dst_dir: str, layout: Optional[str] = None) -> list:
    """Copy the tokenizer / processor / generation files `src_dir` has into `dst_dir`; returns their names.

    With a PyTorch `layout`, processor configs are copied only when written for that layout (an official
    VLChatProcessor config breaks transformers' AutoProcessor, and the other way round)."""
    copied = []
    if src_dir and os.path.isdir(src_dir):
        for name in SIDE_FILES:
            src = os.path.join(src_dir, name)
            if not os.path.isfile(src):
                continue
            if layout is not None and name in PROCESSOR_FILES and processor_format(src) != layout:
                continue
            shutil.copyfile(src, os.path.join(dst_dir, name))  # contents only: permissions from the umask
            copied.append(name)
    return copied


def complete_hf_folder(folder: str, cfg: VLMConfig) -> list:
    """Make an HF-port folder load with `AutoProcessor`: processor_config.json (from `cfg`) and
    chat_template.jinja (the `deepseek` format) unless already there, and the image token declared in
    tokenizer_config.json (the HF processor reads it there). Returns the names written or changed."""
    changed = []
    if not os.path.exists(os.path.join(folder, "processor_config.json")):
        write_hf_processor_config(folder, cfg)
        changed.append("processor_config.json")
    if not os.path.exists(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(CHAT_TEMPLATE)
        changed.append("chat_template.jinja")
    tok_cfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
        try:
            with open(tok_cfg, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{tok_cfg}: unreadable JSON ({e})") from None
        extra = d.get("extra_special_tokens") if isinstance(d, dict) else None
        if isinstance(d, dict) and not (isinstance(extra, dict) and extra.get("image_token")):
            d["extra_special_tokens"] = {**(extra if isinstance(extra, dict) else {}), "image_token": IMAGE_TAG}
            with open(tok_cfg, "w", encoding="utf-8") as f:
                json.dump(d, f, ensure_ascii=False, indent=2)
            changed.append("tokenizer_config.json")
    return changed


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))
