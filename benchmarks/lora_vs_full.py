"""LoRA (r = 16 on the LLM's projections, the adaptor MLP in full) versus full fine-tuning (stage 3's set: LLM +
adaptor + SigLIP) on the tiny config, on this machine's CPU: trainable params, optimizer-state bytes and train-step
time, as LoRA / full ratios, measured in one run.

    .venv/bin/python benchmarks/lora_vs_full.py [--rank 16] [--steps 10] [--batch 8] [--seq-len 96] [--dry-run]

`--dry-run` (what `make test` runs): r = 4, one timed step of 2 rows x 48 tokens, one block per tower and LM layer.

Both steps are the trainer's (`make_train_step` over `make_state`), jit-compiled once, on one CPU device, on the
same random multimodal batch (one image slot a row). The time is the median of `--steps` steps after a warm-up.
AOT per-chip memory for the 7B's LoRA config: not measured here (see configs/deepseek_vl_7b.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsvl_jax import sharding  # noqa: E402
from dsvl_jax.config import tiny  # noqa: E402
from dsvl_jax.models import lora  # noqa: E402
from dsvl_jax.models.vlm import DeepseekVL  # noqa: E402
from dsvl_jax.state import init_adapters, init_params, make_state, param_shardings  # noqa: E402
from dsvl_jax.train import stages  # noqa: E402
from dsvl_jax.train.config_base import base  # noqa: E402
from dsvl_jax.train.optimizer import make_optimizer  # noqa: E402
from dsvl_jax.train.step import make_train_step  # noqa: E402


def batch_for(cfg, rows: int, seq_len: int, seed: int = 0) -> dict:
    """A multimodal batch in the data pipeline's contract: one image slot a row, its tokens at the front."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.text.vocab_size, (rows, seq_len)).astype(np.int32)
    ids[ids == cfg.image_token_id] = 1
    ids[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_id
    s, hs = cfg.siglip.image_size, cfg.sam.image_size
    out = {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "positions": np.tile(np.arange(seq_len), (rows, 1)),
           "segment_ids": np.ones((rows, seq_len), np.int32), "task_ids": np.zeros((rows, seq_len), np.int32),
           "loss_mask": (ids != cfg.image_token_id).astype(np.float32),
           "pixel_values": rng.standard_normal((rows, 1, 3, s, s)).astype(np.float32),
           "high_res_pixel_values": rng.standard_normal((rows, 1, 3, hs, hs)).astype(np.float32),
           "image_mask": np.ones((rows, 1), bool)}
    return {k: jnp.asarray(v) for k, v in out.items()}


def measure(name, cfg, mesh, patterns, spec, batch, steps: int) -> dict:
    _, abstract = param_shardings(cfg, mesh)
    mask = stages.trainable_mask(abstract, patterns)
    opt = base(cfg).optimizer
    opt.warmup_steps = 0
    tx, lr_fn = make_optimizer(opt, 1000, mask)
    adapters = init_adapters(cfg, mesh, spec, 1) if spec else None
    state = make_state(init_params(cfg, mesh, 0), tx, mask, mesh, cfg, adapters, spec)
    trained = stages.count(abstract, mask)[0] + (sum(x.size for x in jax.tree.leaves(adapters)) if spec else 0)
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))
    step = jax.jit(make_train_step(DeepseekVL(cfg), tx, mask, lr_fn, num_tasks=1, loss_chunk=64, lora_spec=spec),
                   donate_argnums=0)
    times = []
    with jax.set_mesh(mesh):
        state, m = step(state, batch)  # compile + warm-up
        jax.block_until_ready(m["loss"])
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
    out = {"trainable_params": trained, "optimizer_bytes": opt_bytes, "step_s": statistics.median(times),
           "loss": float(m["loss"])}
    print(f"{name:5s} trainable {trained:>9,}  optimizer state {opt_bytes / 2**20:7.2f} MiB  step "
          f"{out['step_s'] * 1e3:7.1f} ms (median of {steps})  loss {out['loss']:.4f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--dry-run", action="store_true", help="r = 4, one step of 2 x 48 tokens")
    args = p.parse_args(argv)
    if args.dry_run:
        args.rank, args.steps, args.batch, args.seq_len = 4, 1, 2, 48
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = tiny()
    if args.dry_run:  # compiling dominates a dry run: one block per tower and LM layer (one SAM block, global)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=1),
                          siglip=dataclasses.replace(cfg.siglip, num_hidden_layers=1),
                          sam=dataclasses.replace(cfg.sam, num_hidden_layers=1, global_attn_indexes=(0,)))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    batch = batch_for(cfg, args.batch, args.seq_len)
    print(f"tiny hybrid config, batch {args.batch} x {args.seq_len} tokens, 1 image a row, {jax.devices()[0].device_kind}")
    full = measure("full", cfg, mesh, stages.patterns_for(3), None, batch, args.steps)
    spec = lora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=("llm",))
    low = measure("lora", cfg, mesh, ("aligner/",), spec, batch, args.steps)
    print(f"LoRA r={args.rank} / full fine-tuning: trainable params {low['trainable_params'] / full['trainable_params']:.3f}, "
          f"optimizer-state bytes {low['optimizer_bytes'] / full['optimizer_bytes']:.3f}, "
          f"step time {low['step_s'] / full['step_s']:.2f}")


if __name__ == "__main__":
    main()
