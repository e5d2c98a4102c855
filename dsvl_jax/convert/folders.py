"""What a checkpoint folder is, read from names and small JSON files only (no jax, no Orbax, no weights).

Three kinds of folder hold a DeepSeek-VL model:
- an HF-port or official-layout PyTorch folder: `config.json` (+ safetensors, tokenizer files);
- an Orbax training checkpoint: a workdir (`model_config.json`, `checkpoints/<step>/state`, the tokenizer
  the trainer copied), its `checkpoints` dir, or one step dir;
- a folder whose `config.json` holds `VLMConfig.to_dict()` (what `Processor.from_pretrained` always read).

`describe(path)` answers with the kind, the `VLMConfig` and the folder that holds the tokenizer, so the
processor and the chat CLI need neither jax nor the weights to prepare inputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from dsvl_jax.config import VLMConfig
from dsvl_jax.convert.config_io import from_any
from dsvl_jax.errors import CheckpointError, ConfigError

CHECKPOINTS_DIR = "checkpoints"
MODEL_CONFIG = "model_config.json"
ALT_CONFIG = "config.json"  # accepted inside the checkpoints dir
ITEM_NAMES = ("state", "data")
STATE, DATA = ITEM_NAMES
LORA_BASE = "lora_base"  # a LoRA run's frozen base params, written once beside its checkpoints (train/lora_checkpoint)


class OrbaxError(CheckpointError):
    """An Orbax checkpoint that cannot be read as asked; the message names the folder."""


# ---------------------------------------------------------------------------------------------
# PyTorch folders
# ---------------------------------------------------------------------------------------------
def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({e})") from None


def read_config(path: str) -> tuple:
    """(layout, VLMConfig, raw dict) from `path/config.json`, with errors that name the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        listing = sorted(os.listdir(path))
        what = "is empty" if not listing else f"has no config.json (found {listing[:6]})"
        raise CheckpointError(f"{path}: not a DeepSeek-VL checkpoint: the directory {what}")
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    layout, cfg = from_any(raw, cfg_path)
    return layout, cfg, raw


# ---------------------------------------------------------------------------------------------
# Orbax training checkpoints
# ---------------------------------------------------------------------------------------------
def read_model_config(path: str) -> VLMConfig:
    try:
        with open(path) as f:
            d = json.load(f)
        return VLMConfig.from_dict(d)
    except (OSError, ValueError, TypeError) as e:
        raise OrbaxError(f"{path}: not a model config written by VLMConfig.to_dict() ({e})") from None


@dataclasses.dataclass(frozen=True)
class Location:
    checkpoints_dir: str
    step: int
    step_dir: str
    config_path: str
    workdir: Optional[str]  # holds model_config.json and side files; None if the layout has none


def _steps(checkpoints_dir: str) -> list:
    """Finished steps: Orbax writes into a temporary name and renames to the bare step number at the end."""
    return sorted(int(n) for n in os.listdir(checkpoints_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, n)))


def is_orbax(path: str) -> bool:
    """A training workdir, its checkpoints dir or one step dir (cheap: directory names only)."""
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)) or os.path.isdir(os.path.join(path, STATE)):
        return True
    return any(os.path.isdir(os.path.join(path, n, STATE)) or os.path.isdir(os.path.join(path, n, DATA))
               for n in os.listdir(path) if n.isdigit())


def locate(path: str, step: Optional[int] = None) -> Location:
    """Resolve a workdir / checkpoints dir / step dir (latest step unless `step`) and its model config."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        ckdir = os.path.join(path, CHECKPOINTS_DIR)
    elif os.path.basename(path).isdigit() and (os.path.isdir(os.path.join(path, STATE))
                                               or os.path.isdir(os.path.join(path, DATA))):
        ckdir = os.path.dirname(path)
        if step is not None and step != int(os.path.basename(path)):
            raise OrbaxError(f"{path} is the step-{int(os.path.basename(path))} folder, but step {step} was asked")
        step = int(os.path.basename(path))
    else:
        ckdir = path
    steps = _steps(ckdir) if os.path.isdir(ckdir) else []
    if not steps:
        raise OrbaxError(f"{ckdir}: no finished Orbax checkpoint step (expected <step>/{STATE} folders)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise OrbaxError(f"{ckdir}: no step {step}; the checkpoint has steps {steps}")
    parent = os.path.dirname(ckdir)
    candidates = [os.path.join(parent, MODEL_CONFIG), os.path.join(ckdir, ALT_CONFIG), os.path.join(ckdir, MODEL_CONFIG)]
    config_path = next((c for c in candidates if os.path.isfile(c)), None)
    if config_path is None:
        raise OrbaxError(f"{ckdir}: no model config: expected {candidates[0]} (or {ALT_CONFIG} in the checkpoints "
                         f"dir) holding VLMConfig.to_dict()")
    workdir = parent if os.path.basename(ckdir) == CHECKPOINTS_DIR else None
    return Location(ckdir, step, os.path.join(ckdir, str(step)), config_path, workdir)


# ---------------------------------------------------------------------------------------------
# any of them
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Folder:
    kind: str  # "hf" | "official" | "orbax" | "vlm_config"
    config: VLMConfig
    files_dir: str  # where the tokenizer / processor files are (an Orbax checkpoint's workdir)


def describe(path) -> Folder:
    """The kind, model config and tokenizer folder of a checkpoint folder; errors name the folder."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
        raise FileNotFoundError(f"{path}: no such directory")
    if is_orbax(path):
        loc = locate(path)
        # A bare checkpoints or step dir has no workdir; its tokenizer, if any, sits beside the config.
        files = loc.workdir or os.path.dirname(loc.config_path)
        return Folder("orbax", read_model_config(loc.config_path), files)
    cfg_path = os.path.join(path, "config.json")
    raw = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
    if isinstance(raw, dict) and "model_type" not in raw and "text" in raw:  # VLMConfig.to_dict()
        try:
            return Folder("vlm_config", VLMConfig.from_dict(raw), path)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{cfg_path}: not a VLMConfig.to_dict() nor an HF/official config ({e})") from None
    layout, cfg, _ = read_config(path)
    return Folder(layout, cfg, path)


def describe_files(path) -> str:
    """The folder that holds the tokenizer of the checkpoint at `path` (`path` itself unless it is an Orbax
    checkpoints or step dir, whose workdir holds it)."""
    path = os.fspath(path)
    if is_orbax(path):
        try:
            loc = locate(path)
        except (OrbaxError, FileNotFoundError):
            return path
        return loc.workdir or os.path.dirname(loc.config_path)
    return path
