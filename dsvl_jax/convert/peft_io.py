"""LoRA adapters ↔ a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for transformers'
`DeepseekVL(Hybrid)ForConditionalGeneration`, which `peft.PeftModel.from_pretrained(model, folder)` loads.

Names come from the checkpoint key map's HF-port layout: our dense layer `language_model/layers/self_attn/q_proj`
(stacked) is the torch module `model.language_model.layers.{i}.self_attn.q_proj`, whose adapter tensors peft
stores as `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (our A is
[in dims…, r], our B [r, out dims…]: the same `linear` transform as the kernels). Layers the HF port fuses
with others (SAM's qkv) have no PEFT form. Base params trained in full (`lora.full`) travel as peft's
`modules_to_save`: whole torch modules, under `base_model.model.<module>.<param>`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import keymap
from dsvl_jax.convert.export import atomic_directory
from dsvl_jax.errors import CheckpointError
from dsvl_jax.models import lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _linear_mappings(cfg: VLMConfig) -> dict:
    """{our kernel path: [HF mappings, one per layer]} for the HF layout's linear tensors."""
    out: dict = {}
    for m in keymap.mappings(cfg, "hf"):
        if m.kind == "linear":
            for p in m.ours:
                out.setdefault(p, []).append(m)
    return out


def _modules(cfg: VLMConfig, layer: str, linear: dict) -> list:
    """[(layer index or None, torch module name)] of one of our dense layers."""
    ms = linear.get(f"{layer}/kernel")
    if not ms:
        raise CheckpointError(f"LoRA layer {layer!r} has no linear tensor in the HF layout")
    out = []
    for m in ms:
        if len(m.ours) != 1:
            raise CheckpointError(f"LoRA layer {layer!r}: the HF layout fuses it with {list(m.ours)} into "
                                  f"{m.torch_key!r}, which a PEFT adapter cannot express; drop it from lora.targets "
                                  f"or export merged weights (--merge)")
        out.append((m.layer, m.torch_key[:-len(".weight")]))
    return out


def adapter_tensors(cfg: VLMConfig, adapters: dict) -> dict:
    """{peft key: torch-layout array} for flat adapters {"<layer>/lora_a": A, "<layer>/lora_b": B}."""
    linear = _linear_mappings(cfg)
    out = {}
    for layer in lora.layer_paths(adapters):
        a, b = np.asarray(adapters[f"{layer}/{lora.A_NAME}"]), np.asarray(adapters[f"{layer}/{lora.B_NAME}"])
        for i, module in _modules(cfg, layer, linear):
            ai, bi = (a, b) if i is None else (a[i], b[i])
            out[f"{PREFIX}{module}.lora_A.weight"] = keymap.to_torch("linear", [ai], ai.ndim - 1)
            out[f"{PREFIX}{module}.lora_B.weight"] = keymap.to_torch("linear", [bi], 1)
    return out


def full_tensors(cfg: VLMConfig, paths, array_of: Callable) -> tuple:
    """(modules_to_save, {peft key: array}) for base params trained in full: every HF tensor made of them,
    grouped by torch module; a module must be trained whole (peft saves and loads modules, not tensors)."""
    paths = set(paths)
    if not paths:
        return [], {}
    by_module: dict = {}
    for m in keymap.mappings(cfg, "hf"):
        module = m.torch_key.rsplit(".", 1)[0]
        by_module.setdefault(module, []).append(m)
    modules, out = [], {}
    for module, ms in sorted(by_module.items()):
        hit = [m for m in ms if set(m.ours) & paths]
        if not hit:
            continue
        partial = [p for m in ms for p in m.ours if p not in paths]
        if partial or "." not in module:
            raise CheckpointError(f"base params trained in full {sorted(set(p for m in hit for p in m.ours))[:3]} "
                                  f"are part of the torch module {module!r} with params not trained "
                                  f"{partial[:3]}: peft's modules_to_save holds whole modules; export merged "
                                  f"weights (--merge) instead")
        modules.append(module)
        for m in ms:
            arrays = [np.asarray(array_of(p, m.layer)) for p in m.ours]
            out[f"{PREFIX}{m.torch_key}"] = keymap.to_torch(m.kind, arrays, m.in_ndim, m.lead_ones)
    covered = {p for mod in modules for m in by_module[mod] for p in m.ours}
    missing = sorted(paths - covered)
    if missing:
        raise CheckpointError(f"base params trained in full have no HF tensor: {missing[:3]}")
    return modules, out


def adapter_config(cfg: VLMConfig, spec: lora.LoraSpec, adapters: dict, modules_to_save=(),
                   base_model: Optional[str] = None) -> dict:
    linear = _linear_mappings(cfg)
    targets = sorted(name for layer in lora.layer_paths(adapters) for _, name in _modules(cfg, layer, linear))
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else float(spec.alpha)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": sorted(modules_to_save) or None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }


def write_peft(path: str, cfg: VLMConfig, spec: lora.LoraSpec, adapters: dict, *, full_paths=(),
               array_of: Optional[Callable] = None, base_model: Optional[str] = None, overwrite: bool = False) -> str:
    """Write the PEFT folder for flat `adapters` (+ the base params `full_paths`, read by `array_of(path, layer)`)."""
    from safetensors.numpy import save_file
    tensors = adapter_tensors(cfg, adapters)
    modules, full = full_tensors(cfg, full_paths, array_of)
    tensors.update(full)
    config = adapter_config(cfg, spec, adapters, modules, base_model)
    with atomic_directory(path, overwrite) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS_NAME),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return os.path.abspath(path)


def is_peft(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def read_peft(path: str, cfg: VLMConfig, our_shapes: dict) -> tuple:
    """(LoraSpec, flat adapters {path: array}) from a PEFT LoRA folder written for `cfg`'s HF-port model.
    `our_shapes`: {our kernel path: shape or ShapeDtypeStruct} (`state.param_shapes`). Tensors of layers the folder lacks, or of modules `cfg` has no
    place for, are errors naming the key; modules_to_save are not read (adapters only)."""
    from safetensors.numpy import load_file
    cfile, wfile = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for f in (cfile, wfile):
        if not os.path.isfile(f):
            raise CheckpointError(f"{path}: not a PEFT adapter folder ({os.path.basename(f)} is missing)")
    try:
        with open(cfile) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfile}: unreadable JSON ({e})") from None
    if c.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfile}: peft_type {c.get('peft_type')!r}; only LORA adapters can be imported")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("rank_pattern", {}),
                       ("alpha_pattern", {})):
        if c.get(key) not in (plain, None):
            raise CheckpointError(f"{cfile}: {key}={c.get(key)!r} is not supported (plain LoRA only)")
    try:
        spec = lora.LoraSpec(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout") or 0),
                             targets=("re:^$",))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfile}: bad LoRA settings ({e})") from None
    tensors = load_file(wfile)
    linear = _linear_mappings(cfg)
    by_module = {}
    for kernel, ms in linear.items():
        if len(ms[0].ours) == 1:
            for m in ms:
                by_module[m.torch_key[:-len(".weight")]] = (kernel[:-len("/kernel")], m.layer, m.in_ndim)
    parts: dict = {}
    for key, t in tensors.items():
        for kind, name in (("lora_A", lora.A_NAME), ("lora_B", lora.B_NAME)):
            suffix = f".{kind}.weight"
            if key.startswith(PREFIX) and key.endswith(suffix):
                module = key[len(PREFIX):-len(suffix)]
                if module not in by_module:
                    raise CheckpointError(f"{wfile}: {key!r} names a module this model has no dense layer for")
                layer, i, in_ndim = by_module[module]
                parts.setdefault((layer, name), {})[i] = (t, in_ndim)
    adapters = {}
    for (layer, name), per_layer in sorted(parts.items()):
        kshape = tuple(getattr(our_shapes[f"{layer}/kernel"], "shape", our_shapes[f"{layer}/kernel"]))
        stacked = None not in per_layer
        n = kshape[0] if stacked else 1
        if stacked and sorted(per_layer) != list(range(n)):
            missing = sorted(set(range(n)) - set(per_layer))
            raise CheckpointError(f"{wfile}: {layer} has adapters for some layers only (missing {missing[:4]}); "
                                  f"dsvl_jax adapts a stacked layer in every block")
        kin = kshape[1:] if stacked else kshape
        arrays = []
        for i in (range(n) if stacked else [None]):
            t, in_ndim = per_layer[i]
            shape = (tuple(kin[:in_ndim]) + (spec.rank,)) if name == lora.A_NAME else ((spec.rank,) + tuple(kin[in_ndim:]))
            if keymap.torch_shape("linear", [shape], in_ndim if name == lora.A_NAME else 1) != tuple(t.shape):
                raise CheckpointError(f"{wfile}: {layer} {name} has shape {tuple(t.shape)}, r={spec.rank} needs "
                                      f"{keymap.torch_shape('linear', [shape], in_ndim if name == lora.A_NAME else 1)}")
            arrays.append(keymap.to_ours("linear", t, [shape], in_ndim if name == lora.A_NAME else 1)[0])
        adapters[f"{layer}/{name}"] = np.stack(arrays) if stacked else arrays[0]
    if not adapters:
        raise CheckpointError(f"{wfile}: no LoRA tensors (base_model.model.<module>.lora_A/B.weight)")
    layers = lora.layer_paths(adapters)
    spec = lora.LoraSpec(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                         targets=tuple(f"re:^{layer}$" for layer in layers))
    return spec, adapters
