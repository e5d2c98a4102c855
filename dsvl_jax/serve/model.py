"""Checkpoint folder → (VLM, Processor) for the inference commands (`dsvl-serve`, `dsvl-eval`), on a mesh of
all devices when there is more than one.

The tokenizer is read first (a missing or unreadable one fails in milliseconds, before the weights),
then the weights (`load_pretrained`: HF-port, official or Orbax layout), then the Processor, which
checks that tokenizer and config agree. Every failure is a `LoadError` naming the folder.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

from dsvl_jax import sharding
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.errors import CheckpointError, ConfigError
from dsvl_jax.models.quant import check_weights
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer import Tokenizer


class LoadError(ValueError):
    """A checkpoint, tokenizer or mesh setting the command cannot use."""


def choose_mesh(spec: str):
    """"auto": all devices on the data axis when there are several, else None; "none": None;
    "D,F,T": a data × fsdp × tensor mesh of those sizes (one may be -1)."""
    if spec == "none":
        return None
    if spec == "auto":
        return sharding.make_mesh(data=-1) if jax.device_count() > 1 else None
    try:
        sizes = [int(s) for s in spec.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise LoadError(f"--mesh {spec!r}: expected auto, none or DATA,FSDP,TENSOR (e.g. 1,1,8)")
    try:
        return sharding.make_mesh(*sizes)
    except ValueError as e:
        raise LoadError(f"--mesh {spec!r}: {e}") from None


def load(ckpt: str, *, dtype: Optional[str] = None, mesh: str = "auto", weights: Optional[str] = None):
    """(VLM, Processor) for the checkpoint folder `ckpt`; raises `LoadError`. `weights` ("fp32" | "bf16" |
    "int8") converts the loaded model (`VLM.with_weights`; int8 quantizes the LLM linears at load)."""
    if weights is not None:
        try:
            check_weights(weights, "--weights")
        except ValueError as e:
            raise LoadError(str(e)) from None
    if not os.path.isdir(ckpt):
        raise LoadError(f"--ckpt {ckpt!r}: no such directory")
    try:
        tokenizer = Tokenizer.from_file(ckpt)
    except (OSError, ValueError) as e:
        raise LoadError(f"--ckpt {ckpt}: {e}") from None
    place = choose_mesh(mesh)
    try:
        vlm = load_pretrained(ckpt, dtype=dtype, mesh=place)
        if weights is not None:
            vlm = vlm.with_weights(weights)
    except (OSError, CheckpointError, ConfigError, ValueError) as e:
        raise LoadError(f"--ckpt {ckpt}: {e}" if ckpt not in str(e) else str(e)) from None
    try:
        processor = Processor(tokenizer, vlm.config)
    except ValueError as e:
        raise LoadError(f"--ckpt {ckpt}: {e}") from None
    return vlm, processor
