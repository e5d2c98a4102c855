"""Training config files, loaded by path, and what the per-slice TPU configs share.

A config file (`configs/*.py`, `configs/tpu/*.py`) defines `get_config(arg)` → an ml_collections
ConfigDict, big_vision's convention: `dsvl-train --config FILE[:arg]` reads it through ml_collections'
`config_flags`, everything else through `load_config("FILE[:arg]")` here. Config files stay files (they
are not modules of this package) and import what they share from the package.

A per-slice file (configs/tpu/*.py) names its TPU (`ACCELERATOR`, `TOPOLOGY`), lists its variants as
`LAYOUTS = {"7b_stage2": Layout(...), ...}` and returns `slice_config(arg, LAYOUTS, __file__)`: the paper
stage of configs/deepseek_vl_<size>.py laid out for the slice (mesh, micro-batching, remat). Its
argument is `variant[,data=MANIFEST.json]`; the manifest names the corpus in one file the hosts share
(instead of --config.data.tokenizer and a long --config.data.sources_json on every launch):

    {"tokenizer": "/mnt/gcs/dsvl/tokenizer.json",
     "sources": [{"name": "text", "paths": "/mnt/gcs/dsvl/data/text-*.array_record", "weight": 0.7,
                  "modality": "text"}, ...],
     "eval_sources": [...]}                                  (eval_sources optional)
"""
from __future__ import annotations

import importlib.util
import json
import os
import types
from typing import NamedTuple

MODELS = {"1p3b": "deepseek_vl_1p3b", "7b": "deepseek_vl_7b"}  # size → configs/<file>.py of its paper stages


def config_module(path: str) -> types.ModuleType:
    """A config file as a module (not registered in sys.modules: config files are not package modules)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    name = "dsvl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(spec: str):
    """`path.py[:arg]` → the file's `get_config(arg)` (`get_config()` without an argument)."""
    path, _, arg = spec.partition(":")
    try:
        mod = config_module(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{spec}: {e}") from None
    return mod.get_config(arg) if arg else mod.get_config()


class Layout(NamedTuple):
    """How one paper stage runs on a slice; the global batch and schedule stay the paper's."""

    mesh: tuple[int, int, int]  # (data, fsdp, tensor); one may be -1
    grad_accum: int  # micro-batches per step: batch / grad_accum rows are live at once
    remat: str = "dots_no_batch"
    data_workers: int = 8  # Grain decoding processes per data stream on each host


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
    """'7b_stage2,data=/m.json' → ('7b_stage2', {'data': '/m.json'})."""
    variant, *rest = arg.split(",")
    extra = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key != "data":
            raise ValueError(f"config argument {arg!r}: after the variant only data=MANIFEST.json is understood")
        extra[key] = value
    return variant, extra


def apply_manifest(c, path: str):
    """Set config.data's tokenizer, sources and eval_sources from a data manifest (JSON)."""
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"data manifest {path}: {e}") from None
    unknown = set(m) - {"tokenizer", "sources", "eval_sources"}
    if unknown or "sources" not in m:
        raise ValueError(f"data manifest {path}: expected keys tokenizer, sources[, eval_sources]; got {sorted(m)}")
    c.data.sources = list(m["sources"])
    c.data.eval_sources = list(m.get("eval_sources", []))
    if "tokenizer" in m:
        c.data.tokenizer = m["tokenizer"]
    return c


def slice_config(arg: str, layouts: dict[str, Layout], slice_file: str):
    """The config of `arg` ('<size>_stage<n>[,data=MANIFEST.json]') for the slice file `slice_file`
    (configs/tpu/<slice>.py): configs/deepseek_vl_<size>.py's stage n with the slice's layout."""
    variant, extra = parse_arg(arg)
    if variant not in layouts:
        raise ValueError(f"unknown variant {variant!r} for this slice: {', '.join(layouts)}")
    model, _, stage = variant.partition("_stage")
    layout = layouts[variant]
    configs = os.path.dirname(os.path.dirname(os.path.abspath(slice_file)))
    c = config_module(os.path.join(configs, MODELS[model] + ".py")).get_config(f"stage{stage}")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = layout.mesh
    c.grad_accum = layout.grad_accum
    c.model.remat_policy = layout.remat
    if c.model.get("sam") is not None:
        # The figures in configs/tpu/*.py were compiled with the blockwise XLA path. "auto" (the Pallas kernel, run per
        # shard through shard_map under the mesh) needs less HBM; re-run tpu/compile_all.py before using it.
        c.model.sam_attention_impl = "blockwise"
    c.data.workers = layout.data_workers
    if "data" in extra:
        apply_manifest(c, extra["data"])
    return c
