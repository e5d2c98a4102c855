"""What the per-slice configs share: a paper stage of DeepSeek-VL 1.3B / 7B (configs/deepseek_vl_*.py) laid out
for one TPU slice (mesh, micro-batching, remat), and the data manifest.

A slice file lists its variants as `LAYOUTS = {"7b_stage2": Layout(...), ...}` and calls `slice_config`.
The config argument is `variant[,data=MANIFEST.json]`; the manifest names the corpus in one file the
hosts share (instead of --config.data.tokenizer and a long --config.data.sources_json on every launch):

    {"tokenizer": "/mnt/gcs/dsvl/tokenizer.json",
     "sources": [{"name": "text", "paths": "/mnt/gcs/dsvl/data/text-*.array_record", "weight": 0.7,
                  "modality": "text"}, ...],
     "eval_sources": [...]}                                  (eval_sources optional)
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import NamedTuple

CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"1p3b": "deepseek_vl_1p3b", "7b": "deepseek_vl_7b"}


class Layout(NamedTuple):
    """How one paper stage runs on the slice; the global batch and schedule stay the paper's."""

    mesh: tuple[int, int, int]  # (data, fsdp, tensor); one may be -1
    grad_accum: int  # micro-batches per step: batch / grad_accum rows are live at once
    remat: str = "dots_no_batch"
    data_workers: int = 8  # Grain decoding processes per data stream on each host


def load_file(path: str):
    spec = importlib.util.spec_from_file_location(f"dsvl_config_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def slice_config(arg: str, layouts: dict[str, Layout]):
    variant, extra = parse_arg(arg)
    if variant not in layouts:
        raise ValueError(f"unknown variant {variant!r} for this slice: {', '.join(layouts)}")
    model, _, stage = variant.partition("_stage")
    layout = layouts[variant]
    c = load_file(os.path.join(CONFIGS, MODELS[model] + ".py")).get_config(f"stage{stage}")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = layout.mesh
    c.grad_accum = layout.grad_accum
    c.model.remat_policy = layout.remat
    if c.model.get("sam") is not None:
        # The figures below were compiled with the blockwise XLA path. "auto" (the Pallas kernel, run per
        # shard through shard_map under the mesh) needs less HBM; re-run tpu/compile_all.py before using it.
        c.model.sam_attention_impl = "blockwise"
    c.data.workers = layout.data_workers
    if "data" in extra:
        apply_manifest(c, extra["data"])
    return c
