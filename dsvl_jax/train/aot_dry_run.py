"""`--dry-run` of the ahead-of-time compile tools (tools/aot_compile.py, tpu/compile_all.py, tools/aot_decode.py):
the one place that says how a documented real-shape command is shrunk so that it compiles in seconds.

A dry run parses and checks every argument as the real run does (config, topology and --slices through
libtpu, mesh, batch divisibility, remat policies, LoRA spec, stage), then compiles the same step for the same
topology and mesh with
- a tiny model of the same layout: SAM + SigLIP for a hybrid (7B) config, SigLIP alone for the 1.3B, with
  the real config's adapter, token merge, dtypes, per-tower remat policies, SAM attention implementation and
  quantization (`dsvl_jax.config.tiny` supplies the sizes; attention stays multi-head when the real one is);
- tiny shapes: `DRY_RUN_SEQ_LEN` tokens a row and the smallest global batch the mesh and grad_accum allow
  (one row per data x fsdp shard per micro-batch); the config's image slots a row; `DRY_RUN_DECODE_SLOTS`
  KV cache slots for a decode step.
Its report is the real run's report under `DRY_RUN_BANNER`: the figures are the tiny model's, never the config's.
"""
from __future__ import annotations

import dataclasses

from dsvl_jax.config import VLMConfig, tiny

DRY_RUN_SEQ_LEN = 64
DRY_RUN_DECODE_SLOTS = 64
DRY_RUN_BANNER = ("DRY RUN at tiny shapes (--dry-run): the same command, topology and mesh, a tiny model of the "
                  "same layout; these figures are NOT this config's")
DRY_RUN_HELP = ("check every argument as a real run does, then compile the same step for the same topology and "
                "mesh with a tiny model of the same layout (hybrid or SigLIP-only, same remat / SAM attention / "
                "LoRA / dtypes) at tiny shapes, in seconds; the report says it is a dry run")

# What the tiny model takes over from the real one: everything that is layout or policy, not size.
_KEPT = ("adapter", "adapter_depth", "tie_word_embeddings", "unused_hybrid_norms", "token_merge", "dtype",
         "param_dtype", "remat_policy", "remat_policy_sam", "remat_policy_siglip", "remat_policy_llm",
         "sam_attention_impl", "quantization")


def tiny_model_like(real: VLMConfig) -> VLMConfig:
    """A tiny model of `real`'s layout (towers, adapter, dtypes, remat, SAM attention impl, quantization)."""
    small = tiny(hybrid=real.sam is not None)
    text = small.text
    if real.text.num_key_value_heads == real.text.num_attention_heads:  # the 1.3B and 7B are multi-head
        text = dataclasses.replace(text, num_key_value_heads=text.num_attention_heads)
    return small.replace(text=text, **{k: getattr(real, k) for k in _KEPT})


def dry_run_batch(batch_shards: int, grad_accum: int) -> int:
    """The smallest global batch a step over `batch_shards` (data x fsdp) in `grad_accum` micro-batches takes."""
    return batch_shards * grad_accum
