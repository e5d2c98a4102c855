"""A LoRA run's pieces from its training config (`config.lora`, see `config_base`): the spec, the base params it
trains in full (`lora.full`: none by default, e.g. the adaptor), the first adapters (fresh, or a PEFT adapter
folder: `lora.from_peft`) and the checks `validate` runs."""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import peft_io
from dsvl_jax.errors import CheckpointError, ConfigError
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs
from dsvl_jax.state import adapter_shardings, init_adapters, param_shapes
from dsvl_jax.train.stages import GROUPS, patterns_for


def enabled(config) -> bool:
    return bool(config.lora.rank)


def spec(config) -> lora.LoraSpec | None:
    """The LoRA spec of `config.lora`, None when rank is 0 (no LoRA); bad values are a ConfigError naming the key."""
    c = config.lora
    if not c.rank:
        return None
    try:
        return lora.LoraSpec(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), targets=tuple(c.targets))
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def base_patterns(config) -> tuple:
    """Path patterns of the base params trained in full beside the adapters (() = the base is frozen)."""
    full = tuple(config.lora.full)
    return patterns_for(None, full) if full else ()


def check(config, mcfg: VLMConfig) -> None:
    """ConfigError for a LoRA config that cannot run: bad values, targets that match no dense layer, unknown groups."""
    s = spec(config)
    for t in config.lora.full:
        if t not in GROUPS and "/" not in t and not t.startswith("re:"):
            raise ConfigError(f"config.lora.full entry {t!r}: expected one of {sorted(GROUPS)} or a param path")
    ids, images = dummy_inputs(mcfg)
    try:
        lora.abstract_adapters(DeepseekVL(mcfg), s, ids, **images)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    src = config.lora.from_peft
    if src and not peft_io.is_peft(src):
        raise ConfigError(f"config.lora.from_peft={src!r}: no {peft_io.CONFIG_NAME} there (a PEFT adapter folder, "
                          f"e.g. from dsvl-convert --to peft)")


def count(adapters) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


def initial_adapters(config, mcfg: VLMConfig, mesh, s: lora.LoraSpec):
    """Fresh adapters (A seeded from config.seed, B zero), or those of config.lora.from_peft; placed on the mesh."""
    src = config.lora.from_peft
    if not src:
        return init_adapters(mcfg, mesh, s, config.seed + 1)
    shardings, abstract = adapter_shardings(mcfg, mesh, s)
    try:
        got, flat = peft_io.read_peft(src, mcfg, param_shapes(mcfg))
    except CheckpointError as e:
        raise ConfigError(f"config.lora.from_peft: {e}") from None
    want = traverse_util.flatten_dict(abstract, sep="/")
    if (got.rank, got.alpha) != (s.rank, s.alpha) or set(flat) != set(want):
        differ = sorted(set(flat) ^ set(want))[:3]
        raise ConfigError(f"config.lora.from_peft={src!r} holds r={got.rank}, alpha={got.alpha} on "
                          f"{len(lora.layer_paths(flat))} layers; config.lora asks for r={s.rank}, alpha={s.alpha} on "
                          f"{len(lora.layer_paths(want))} (differing: {differ}): make rank, alpha and targets match")
    placed = {k: jax.device_put(np.asarray(flat[k]).astype(want[k].dtype), sh)
              for k, sh in traverse_util.flatten_dict(shardings, sep="/").items()}
    return traverse_util.unflatten_dict(placed, sep="/")
