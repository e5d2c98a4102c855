"""A LoRA run's Orbax workdir, for the converter: `lora.json` (the spec and the base params trained in full, written
by the trainer) and the adapters, restored alone from the `state` item's "lora" entry (the base is not read);
`MergedSource` is an `OrbaxSource` whose adapted kernels read as W + scale·A·B (`dsvl-convert --merge`)."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from flax import traverse_util

from dsvl_jax.convert.orbax_io import OrbaxError, OrbaxSource, locate
from dsvl_jax.models import lora

LORA_META = "lora.json"


def write_meta(workdir: str, spec: lora.LoraSpec, full_patterns) -> str:
    path = os.path.join(workdir, LORA_META)
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "targets": list(spec.targets),
                   "full": list(full_patterns)}, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def is_lora_run(path: str, step: Optional[int] = None) -> bool:
    """Whether the Orbax checkpoint at `path` comes from a LoRA run (lora.json beside its model config)."""
    try:
        loc = locate(path, step)
    except OrbaxError:
        return False
    return os.path.isfile(os.path.join(os.path.dirname(loc.config_path), LORA_META))


def read_meta(path: str, step: Optional[int] = None) -> tuple:
    """(LoraSpec, full-training patterns) of the LoRA run at `path`."""
    loc = locate(path, step)
    meta_path = os.path.join(os.path.dirname(loc.config_path), LORA_META)
    try:
        with open(meta_path) as f:
            d = json.load(f)
        spec = lora.LoraSpec(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                             targets=tuple(d["targets"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OrbaxError(f"{meta_path}: not a readable LoRA description ({type(e).__name__}: {e})") from None
    return spec, tuple(d.get("full", ()))


def read_adapters(source: OrbaxSource) -> dict:
    """The flat adapters {path: numpy array} of the checkpoint `source` reads (nothing else is restored)."""
    import orbax.checkpoint as ocp
    meta = source._ckpt.metadata(source.state_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if "lora" not in tree:
        raise OrbaxError(f"{source.state_dir}: the state holds no LoRA adapters ('lora'): not a LoRA run's checkpoint")
    flat = traverse_util.flatten_dict(tree["lora"], sep="/")
    item = {"lora": traverse_util.unflatten_dict({p: np.empty((0,), m.dtype) for p, m in flat.items()}, sep="/")}
    args = {"lora": traverse_util.unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in flat}, sep="/")}
    out = source._ckpt.restore(source.state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                             partial_restore=True))
    return traverse_util.flatten_dict(out["lora"], sep="/")


class MergedSource:
    """The three callbacks of `export.plan_tensors` over an `OrbaxSource`, with every adapted kernel merged
    (W + scale·A·B, in float32, cast back to W's dtype), one param at a time."""

    def __init__(self, source: OrbaxSource, spec: lora.LoraSpec, adapters: dict):
        self.source, self.spec, self.adapters = source, spec, adapters
        self.layers = set(lora.layer_paths(adapters))
        self.config = source.config

    def shape_of(self, p: str):
        return self.source.shape_of(p)

    def dtype_of(self, p: str):
        return self.source.dtype_of(p)

    def array_of(self, p: str, layer) -> np.ndarray:
        w = self.source.array_of(p, layer)
        name = p[:-len("/kernel")] if p.endswith("/kernel") else None
        if name not in self.layers:
            return w
        a, b = self.adapters[f"{name}/{lora.A_NAME}"], self.adapters[f"{name}/{lora.B_NAME}"]
        if layer is not None:
            a, b = a[layer], b[layer]
        d = lora.delta(a.astype(np.float32), b.astype(np.float32), self.spec.scale, w.shape)
        return (w.astype(np.float32) + d).astype(w.dtype)


def merged(path: str, source: OrbaxSource, flat: dict) -> dict:
    """The flat params `source` read from `path`, with a LoRA run's adapters merged into their kernels (what the
    run's model computes); other checkpoints' params unchanged."""
    if not is_lora_run(path, source.location.step):
        return flat
    spec, _ = read_meta(path, source.location.step)
    adapters = read_adapters(source)
    out = dict(flat)
    for layer in lora.layer_paths(adapters):
        w = out[f"{layer}/kernel"]
        d = lora.delta(adapters[f"{layer}/{lora.A_NAME}"].astype(np.float32),
                       adapters[f"{layer}/{lora.B_NAME}"].astype(np.float32), spec.scale, w.shape)
        out[f"{layer}/kernel"] = (np.asarray(w, np.float32) + d).astype(w.dtype)
    return out
