"""Checks of a training config that must fail before anything compiles, with messages that name the key."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax

from dsvl_jax.config import VLMConfig
from dsvl_jax.errors import ConfigError
from dsvl_jax.state import abstract_params
from dsvl_jax.train import benchmarks, lora_run
from dsvl_jax.train.config_base import base
from dsvl_jax.train.stages import GROUPS, UNUSED, count, patterns_for, trainable_mask


# Dicts whose keys are data, not config keys: checked by their users (lr_mult: `optimizer.scale_by_group`).
OPEN_DICTS = ("optimizer.lr_mult",)


def _unknown_keys(cfg, ref, prefix=""):
    out = []
    for k in cfg.keys():
        path = f"{prefix}{k}"
        if k not in ref:
            out.append(path)
        elif path not in OPEN_DICTS and k != "model" and hasattr(cfg[k], "keys") and hasattr(ref[k], "keys"):
            out += _unknown_keys(cfg[k], ref[k], path + ".")
    return out


def sources(config, key: str = "sources") -> list:
    """config.data.<key>, or its JSON twin <key>_json when that is set (the command-line form)."""
    text = config.data.get(f"{key}_json", "")
    if not text:
        return [dict(s) for s in config.data[key]]
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config.data.{key}_json is not valid JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ConfigError(f"config.data.{key}_json must be a JSON list of objects, got {text[:80]!r}")
    return value


def model_config(config) -> VLMConfig:
    try:
        return VLMConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def check(config, *, device_count: int | None = None) -> VLMConfig:
    """Raise ConfigError for any problem a run would otherwise hit after compiling (or never notice)."""
    unknown = _unknown_keys(config, base(VLMConfig()))
    if unknown:
        raise ConfigError(f"unknown config keys: {unknown}")
    mcfg = model_config(config)
    n = jax.device_count() if device_count is None else device_count
    m = config.mesh
    if m.devices:
        if not 0 < m.devices <= n or jax.process_count() > 1:
            raise ConfigError(f"config.mesh.devices={m.devices}: must be in 1..{n} (and single-process)")
        n = m.devices
    slices = m.get("slices", 1)
    if not isinstance(slices, int) or slices < 1 or n % slices:
        raise ConfigError(f"config.mesh.slices={slices}: must be a positive integer dividing the {n} devices")
    n //= slices  # data, fsdp and tensor are sizes inside one slice
    sizes = [m.data, m.fsdp, m.tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"config.mesh {dict(m)}: sizes must be positive, at most one -1")
    known = 1
    for s in sizes:
        known *= s if s != -1 else 1
    if n % known or (-1 not in sizes and known != n):
        raise ConfigError(f"config.mesh data={m.data} fsdp={m.fsdp} tensor={m.tensor} does not divide the {n} devices"
                          f"{f' of one slice (slices={slices})' if slices > 1 else ''}")
    full = [s if s != -1 else n // known for s in sizes]
    batch_shards = slices * full[0] * full[1]
    if config.batch_size <= 0 or config.batch_size % (batch_shards * config.grad_accum):
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by data×fsdp={batch_shards} × "
                          f"grad_accum={config.grad_accum}")
    if jax.process_count() > 1 and config.batch_size % jax.process_count():
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by {jax.process_count()} processes")
    shards = config.data.shard_count
    if shards < 0 or (shards and (shards % jax.process_count() or config.batch_size % shards)):
        raise ConfigError(f"config.data.shard_count={shards}: must be 0 (one per process) or a multiple of the "
                          f"{jax.process_count()} processes that divides config.batch_size={config.batch_size}")
    if lora_run.enabled(config):  # the adapters are trained; stage / trainable are not used
        lora_run.check(config, mcfg)
    else:
        _check_trainable(config, mcfg)
    _check_rest(config, mcfg)
    return mcfg


def _check_trainable(config, mcfg: VLMConfig) -> None:
    if config.stage not in (1, 2, 3) and not config.trainable:
        raise ConfigError(f"config.stage={config.stage}: expected 1, 2 or 3, or an explicit config.trainable")
    for t in config.trainable:
        if t not in GROUPS and "/" not in t and not t.startswith("re:"):
            raise ConfigError(f"config.trainable entry {t!r}: expected one of {sorted(GROUPS)} or a param path")
    pats = patterns_for(config.stage, tuple(config.trainable))
    if not mcfg.is_hybrid:
        pats = tuple(p for p in pats if not p.startswith("vision/sam"))
    if not pats or all(p in UNUSED for p in pats):
        raise ConfigError(f"stage {config.stage} with trainable={tuple(config.trainable)} trains nothing")
    abstract = nn.meta.unbox(abstract_params(mcfg))  # shapes only: nothing is allocated
    if count(abstract, trainable_mask(abstract, pats))[0] == 0:
        raise ConfigError(f"stage {config.stage} with trainable={tuple(config.trainable)} trains nothing: "
                          f"the patterns {pats} match no parameter")


def _check_rest(config, mcfg: VLMConfig) -> None:
    if config.total_steps <= 0:
        raise ConfigError(f"config.total_steps={config.total_steps} must be positive")
    if not 0 <= config.stop_at_step <= config.total_steps:
        raise ConfigError(f"config.stop_at_step={config.stop_at_step} must be in 0..config.total_steps="
                          f"{config.total_steps} (0 = total_steps)")
    if config.log_every <= 0:
        raise ConfigError(f"config.log_every={config.log_every} must be positive")
    if config.data.max_skips_in_a_row is not None and config.data.max_skips_in_a_row < 0:
        raise ConfigError(f"config.data.max_skips_in_a_row={config.data.max_skips_in_a_row} must be >= 0 "
                          "(0 = no limit)")
    if config.seq_len <= 1:
        raise ConfigError(f"config.seq_len={config.seq_len} must be > 1")
    if config.seq_len > mcfg.text.max_position_embeddings:
        raise ConfigError(f"config.seq_len={config.seq_len} exceeds the model context "
                          f"{mcfg.text.max_position_embeddings}")
    if config.init.from_checkpoint and config.init.from_pretrained:
        raise ConfigError("config.init: give from_checkpoint or from_pretrained, not both")
    for key in ("from_checkpoint", "from_pretrained"):
        path = config.init[key]
        if path and not path.startswith("gs://") and not os.path.exists(path):
            raise ConfigError(f"config.init.{key}={path!r} does not exist")
    d = config.data
    if not sources(config, "sources"):
        raise ConfigError("config.data.sources is empty: give at least one {name, paths|tfds_dir, weight, modality}")
    sources(config, "eval_sources")
    benchmarks.check(config)
    if not d.tokenizer:
        raise ConfigError("config.data.tokenizer is empty: give a tokenizer.json or a sentencepiece .model")
    if not d.tokenizer.startswith("gs://") and not os.path.exists(d.tokenizer):
        raise ConfigError(f"config.data.tokenizer={d.tokenizer!r} does not exist")
    if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
        raise ConfigError("config.checkpoint.every and .keep must be positive")
