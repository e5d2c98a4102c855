"""`load_pretrained`: a PyTorch checkpoint folder (HF-port or official layout) → `VLM`, one tensor at a time.

The layout is detected from `config.json`'s `model_type`; the declarative key map (`keymap.py`) says
where each tensor goes and how it is transformed. Stacked layer params are assembled in one host
buffer each and moved to the device (sharded when a mesh is given) as soon as they are complete, so
the host never holds a second full copy of the model.
"""
from __future__ import annotations

import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import keymap, lora_orbax, orbax_io
from dsvl_jax.convert.folders import read_config  # noqa: F401  (part of this module's interface)
from dsvl_jax.convert.safetensors_io import DTYPES, FLOAT_CODES, SafetensorsReader
from dsvl_jax.errors import CheckpointError
from dsvl_jax.runtime import VLM
from dsvl_jax.state import abstract_params, param_shardings

# Keys PyTorch checkpoints may carry that hold nothing the model needs.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def _target_dtype(code: str, dtype) -> np.dtype:
    if dtype is not None:
        return np.dtype(jnp.dtype(dtype))
    return DTYPES[code]


def checkpoint_dtype(reader: SafetensorsReader) -> str:
    """The dtype a checkpoint implies for compute and params: its float dtype when it has exactly one
    (float64 computes in float32), else float32."""
    codes = {reader.info(k)[1] for k in reader.keys()} & set(FLOAT_CODES)
    code = codes.pop() if len(codes) == 1 else "F32"
    return "float32" if code == "F64" else DTYPES[code].name


def source_config(reader: SafetensorsReader, cfg: VLMConfig, layout: str) -> VLMConfig:
    """Settle what config.json cannot say: whether an official hybrid stores the two unused LayerNorms."""
    if cfg.is_hybrid and layout == "official":
        cfg = cfg.replace(unused_hybrid_norms="vision_model.high_layer_norm.weight" in reader)
    return cfg


def check_tensors(reader: SafetensorsReader, cfg: VLMConfig, layout: str, shapes: dict) -> list:
    """The key map's mappings for this checkpoint, after checking every tensor's name, dtype and shape
    against the config from the headers alone (no data read), so bad input fails before any work."""
    maps = list(keymap.mappings(cfg, layout))
    expected = {m.torch_key for m in maps}
    missing = sorted(expected - set(reader.keys()))
    if missing:
        other = "official" if layout == "hf" else "hf"
        try:
            other_keys = {m.torch_key for m in keymap.mappings(cfg, other)}
        except ValueError:  # the other layout cannot hold this model
            other_keys = set()
        if other_keys and len(other_keys & set(reader.keys())) > len(expected & set(reader.keys())):
            raise CheckpointError(f"{reader.folder}: mixed layouts: config.json is in the {layout} layout but the "
                                  f"tensors are named as in the {other} layout (e.g. {missing[0]!r} is missing)")
        raise CheckpointError(f"{reader.folder}: {len(missing)} tensors missing from the checkpoint, e.g. "
                              f"{missing[:5]} (config says {layout} layout)")
    extra = sorted(k for k in reader.keys() if k not in expected and not k.endswith(IGNORABLE_SUFFIXES))
    tied_head = [k for k in extra if k in ("lm_head.weight", "language_model.lm_head.weight")
                 and cfg.tie_word_embeddings]
    extra = [k for k in extra if k not in tied_head]
    if extra:
        raise CheckpointError(f"{reader.folder}: {len(extra)} unexpected tensors for this config, e.g. {extra[:5]}")
    for m in maps:
        shape, code = reader.info(m.torch_key)
        where = f"{reader.file_of(m.torch_key)}: tensor {m.torch_key!r}"
        if code not in FLOAT_CODES:
            raise CheckpointError(f"{where} has dtype {code}; expected a floating point type")
        want = keymap.torch_shape(m.kind, per_layer_shapes(m, shapes), m.in_ndim, m.lead_ones)
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"{where} has shape {tuple(shape)}; the config needs {tuple(want)} "
                                  f"(for {', '.join(m.ours)})")
    return maps


def per_layer_shapes(m: keymap.Mapping, shapes: dict) -> list:
    """Shapes of the params of mapping `m` as one PyTorch tensor sees them (one layer of a stacked param)."""
    return [shapes[p].shape[1:] if m.layer is not None else shapes[p].shape for p in m.ours]


def load_params(reader: SafetensorsReader, cfg: VLMConfig, layout: str, *, dtype=None, mesh=None) -> dict:
    """Read every tensor the key map names, check shape and dtype, return our nested param dict."""
    boxed = abstract_params(cfg)
    shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
    shardings = None
    if mesh is not None:
        shardings = traverse_util.flatten_dict(sharding.param_shardings(boxed, mesh), sep="/")
    maps = check_tensors(reader, cfg, layout, shapes)

    buffers, filled, out = {}, {}, {}
    n_layers = {}
    for m in maps:
        for p in m.ours:
            if m.layer is not None:
                n_layers[p] = shapes[p].shape[0]

    def finish(p):
        arr = buffers.pop(p)
        out[p] = jax.device_put(arr, shardings[p]) if shardings is not None else jnp.asarray(arr)

    for m in maps:
        code = reader.info(m.torch_key)[1]
        per_layer = per_layer_shapes(m, shapes)
        t = reader.get(m.torch_key)
        target = _target_dtype(code, dtype)
        parts = keymap.to_ours(m.kind, t, per_layer, m.in_ndim)
        del t
        for p, arr in zip(m.ours, parts):
            arr = arr.astype(target, copy=False)
            if m.layer is None:
                buffers[p] = np.ascontiguousarray(arr)
                finish(p)
                continue
            if p not in buffers:
                buffers[p] = np.empty(shapes[p].shape, target)
                filled[p] = 0
            buffers[p][m.layer] = arr
            filled[p] += 1
            if filled[p] == n_layers[p]:
                finish(p)
    if buffers:
        raise CheckpointError(f"{reader.folder}: incomplete stacked params {sorted(buffers)[:3]}")
    return traverse_util.unflatten_dict(out, sep="/")


def load_pretrained(path: str, dtype=None, *, mesh=None, layout: Optional[str] = None, config_overrides=None):
    """A checkpoint folder in the HF-port or official layout, or an Orbax training checkpoint (workdir,
    checkpoints dir or step dir; latest step, params only) → `dsvl_jax.VLM` (config, params, __call__).

    dtype: None keeps the checkpoint's dtype (bf16 stays bf16); otherwise params are cast, and the
    compute dtype follows. mesh: params are placed sharded by the logical rules."""
    if layout in (None, "orbax") and orbax_io.is_orbax(path):
        return _load_orbax(path, dtype, mesh, config_overrides)
    found_layout, cfg, _ = read_config(path)
    if layout is not None and layout != found_layout:
        raise CheckpointError(f"{path}: config.json is in the {found_layout} layout, not {layout}")
    reader = SafetensorsReader(path)
    cfg = source_config(reader, cfg, found_layout)
    d = checkpoint_dtype(reader) if dtype is None else jnp.dtype(dtype).name
    cfg = cfg.replace(dtype=d, param_dtype=d, **(config_overrides or {}))
    try:
        params = load_params(reader, cfg, found_layout, dtype=dtype, mesh=mesh)
    finally:
        reader.close()
    vlm = VLM(cfg, params, mesh=mesh)
    vlm.source = os.path.abspath(path)
    return vlm


def _load_orbax(path: str, dtype, mesh, config_overrides):
    """An Orbax training checkpoint → VLM, keeping the training config (compute dtype included) unless cast."""
    source = orbax_io.OrbaxSource(path)
    cfg = source.config
    if dtype is not None:
        d = jnp.dtype(dtype).name
        cfg = cfg.replace(dtype=d, param_dtype=d)
    cfg = cfg.replace(**(config_overrides or {}))
    # a LoRA run's workdir loads as the model it trained: its adapters merged into the kernels
    flat = lora_orbax.merged(path, source, traverse_util.flatten_dict(source.params(dtype), sep="/"))
    shardings = None
    if mesh is not None:
        shardings = traverse_util.flatten_dict(param_shardings(cfg, mesh)[0], sep="/")
    out = {}
    for p in list(flat):  # one param at a time onto the device(s); the host copy goes as soon as it is placed
        arr = flat.pop(p)
        out[p] = jax.device_put(arr, shardings[p]) if shardings is not None else jnp.asarray(arr)
    vlm = VLM(cfg, traverse_util.unflatten_dict(out, sep="/"), mesh=mesh)
    vlm.source = source.location.workdir  # where tokenizer / processor files travel from
    return vlm
