"""Logit error of bf16 and int8 weights against fp32 at the 1.3B LLM's real widths, random weights.

    python benchmarks/quant_error.py [--layers 4] [--tokens 64] [--batch 2] [--dry-run]

`--dry-run` (what `make test` runs): the tiny preset's LLM, 1 x 8 tokens.

The 1.3B text config (hidden 2048, MLP 5632, 16 heads, vocabulary 102,400) with `--layers` of its 24
decoder layers (the host holds fp32 + int8 + bf16 copies; all 24 need ~13 GB), weights drawn like
transformers' init (normal, std 0.02; norms 1). Random text tokens, one causal forward per variant;
the relative error is |logits - fp32 logits| / std(fp32 logits), max and mean over all positions and
vocabulary entries, and the share of positions whose argmax agrees with fp32.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsvl_jax import config as C  # noqa: E402
from dsvl_jax.models.llama import Decoder, causal_mask  # noqa: E402
from dsvl_jax.models.quant import convert_weights  # noqa: E402


def logits_of(cfg: C.VLMConfig, params, ids):
    dt = jnp.dtype(cfg.dtype)
    model = Decoder(cfg.text, dtype=dt, param_dtype=jnp.dtype(cfg.param_dtype), int8=cfg.quantization == "int8")
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, positions, causal_mask(b, t)))(params),
                      np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="the tiny preset's LLM, 1 x 8 tokens")
    args = ap.parse_args(argv)
    full = C.tiny(hybrid=False) if args.dry_run else C.deepseek_vl_1p3b()
    if args.dry_run:
        args.layers, args.tokens, args.batch = full.text.num_hidden_layers, 8, 1
    cfg = full.replace(text=dataclasses.replace(full.text, num_hidden_layers=args.layers))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.text.vocab_size, (args.batch, args.tokens)), jnp.int32)
    model = Decoder(cfg.text)
    b, t = ids.shape
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, ids, jnp.broadcast_to(jnp.arange(t), (b, t)),
                                                      causal_mask(b, t))["params"]))
    params = init(jax.random.key(0))
    wrapped = {"language_model": params}  # convert_weights works on the VLM's tree paths
    base = logits_of(cfg, params, ids)
    spread = base.std()
    print(f"{'tiny' if args.dry_run else '1.3B'} LLM widths, {args.layers} of {full.text.num_hidden_layers} layers, {args.batch} x {args.tokens} "
          f"random tokens; logit std {spread:.3f}")
    for w in ("bf16", "int8"):
        c, p = convert_weights(cfg, wrapped, w)
        got = logits_of(c, p["language_model"], ids)
        rel = np.abs(got - base) / spread
        agree = (got.argmax(-1) == base.argmax(-1)).mean()
        print(f"  {w}: max rel error {rel.max():.4f}, mean {rel.mean():.5f}, argmax equal at {agree:.1%} of positions")
        del p, got
    return 0


if __name__ == "__main__":
    sys.exit(main())
