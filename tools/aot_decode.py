"""Ahead-of-time compile of one batch-1 decode step for a TPU slice, on a CPU-only host: per-chip weight
memory and the element types of the compiled program's dot operands, for fp32 / bf16 / int8 weights.

    python tools/aot_decode.py --preset deepseek_vl_1p3b --topology v5e:2x2 --tensor 4 [--weights fp32 bf16 int8]

int8 should show about a quarter of fp32's per-chip bytes for the LLM linears (the vision towers and
embeddings stay float). `--dry-run`: the same topology, mesh and weight types for a tiny model of the preset's
layout and a small cache (`dsvl_jax.train.aot_dry_run`), in seconds.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; never try to run on one (set before jax loads)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from dsvl_jax import config as C, sharding  # noqa: E402
from dsvl_jax.generation.engine import CACHE_AXES, _step_apply  # noqa: E402
from dsvl_jax.models.llama import cache_mask  # noqa: E402
from dsvl_jax.models.quant import convert_weights  # noqa: E402
from dsvl_jax.models.vlm import DeepseekVL  # noqa: E402
from dsvl_jax.state import param_shardings  # noqa: E402
from dsvl_jax.train.aot import describe_topology  # noqa: E402
from dsvl_jax.train.aot_dry_run import DRY_RUN_BANNER, DRY_RUN_DECODE_SLOTS, DRY_RUN_HELP, tiny_model_like  # noqa: E402

def model_config(preset: str, weights: str, dry_run: bool = False) -> C.VLMConfig:
    cfg = C.preset(preset) if preset != "tiny" else C.tiny(hybrid=False)
    if dry_run:
        cfg = tiny_model_like(cfg)
    float_cfg = cfg.replace(dtype="bfloat16" if weights == "bf16" else "float32",
                            param_dtype="bfloat16" if weights == "bf16" else "float32")
    return float_cfg.replace(quantization="int8") if weights == "int8" else float_cfg


def compile_step(cfg: C.VLMConfig, mesh, batch: int, slots: int):
    shardings, abstract = param_shardings(cfg, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    t = cfg.text
    cache_shape = (t.num_hidden_layers, batch, slots, t.num_key_value_heads, t.head_dim)
    cache_spec = sharding.logical_to_spec(CACHE_AXES, cache_shape, mesh)
    cache = tuple(jax.ShapeDtypeStruct(cache_shape, jnp.dtype(cfg.dtype), sharding=NamedSharding(mesh, cache_spec))
                  for _ in range(2))
    model = DeepseekVL(cfg)

    def step(params, tokens, positions, kv_valid, cache, slot):
        return model.apply({"params": params}, tokens, positions, cache_mask(kv_valid, slot, 1), cache, slot,
                           method=_step_apply)

    args = (params, jax.ShapeDtypeStruct((batch, 1), jnp.int32), jax.ShapeDtypeStruct((batch, 1), jnp.int32),
            jax.ShapeDtypeStruct((batch, slots), jnp.bool_), cache, jax.ShapeDtypeStruct((), jnp.int32))
    with jax.set_mesh(mesh):
        return jax.jit(step, donate_argnums=4).lower(*args).compile(), abstract


def int8_weight_use(hlo: str) -> dict:
    """In the optimized HLO: the s8 parameters of the entry computation (the int8 weights as they sit in
    HBM), and the instructions producing a float array of an s8 parameter's shape or one layer of it (a
    dequantized copy materialized in memory; 0 when the convert is fused into the consumer)."""
    entry = hlo[hlo.index("ENTRY"):]
    # Instructions of the unfused computations only (entry, loop bodies): inside a fusion a float value
    # of a weight's shape lives in registers/VMEM, not in HBM.
    body, keep = [], False
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            keep = "fused" not in line.split("(")[0] and "fusion" not in line.split("(")[0]
        elif keep:
            body.append(line)
    body = "\n".join(body)
    s8_shapes = set(re.findall(r"parameter\(\d+\)", entry) and
                    re.findall(r"=\s*s8\[([\d,]+)\][^\n]*parameter\(", entry))
    s8_shapes |= {",".join(x.split(",")[1:]) for x in s8_shapes if x.count(",") >= 2}  # one layer of a stack
    float_copies = 0
    for m in re.finditer(r"^\s*%[\w.\-]+\s*=\s*(f32|bf16)\[([\d,]+)\]", body, re.M):
        float_copies += m.group(2) in s8_shapes
    return {"s8_params": len(re.findall(r"=\s*s8\[[\d,]+\][^\n]*parameter\(", entry)),
            "s8_shapes": sorted(s8_shapes), "float_copies_of_s8_shapes": float_copies}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deepseek_vl_1p3b", help="a preset of dsvl_jax.config (deepseek_vl_1p3b, "
                    "deepseek_vl_7b) or tiny (text-only tiny)")
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--tensor", type=int, default=4, help="tensor-parallel size (the rest goes to data)")
    ap.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    ap.add_argument("--slots", type=int, default=1024, help="KV cache slots")
    ap.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP + f"; {DRY_RUN_DECODE_SLOTS} cache slots")
    args = ap.parse_args(argv)
    if args.preset not in C.PRESETS:
        raise SystemExit(f"--preset {args.preset!r}: expected one of {sorted(C.PRESETS)}")
    if args.slots < 1:
        raise SystemExit(f"--slots {args.slots}: must be at least 1")
    devices, gen, chips = describe_topology(args.topology)
    try:
        mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=args.tensor, devices=devices)
    except (ValueError, AssertionError) as e:
        raise SystemExit(f"--tensor {args.tensor}: {e}") from None
    slots = DRY_RUN_DECODE_SLOTS if args.dry_run else args.slots
    if args.dry_run:
        print(DRY_RUN_BANNER)
    print(f"{args.preset} decode step, batch 1, {slots} cache slots, {args.topology} ({chips} chips), "
          f"mesh {dict(mesh.shape)}")
    for w in args.weights:
        cfg = model_config(args.preset, w, args.dry_run)
        compiled, _ = compile_step(cfg, mesh, 1, slots)
        mem = compiled.memory_analysis()
        use = int8_weight_use(compiled.as_text())
        print(f"  {w:5} arguments per chip {mem.argument_size_in_bytes / 2**20:9.2f} MiB (weights + cache), "
              f"temp {mem.temp_size_in_bytes / 2**20:8.1f} MiB; int8 params in HBM: {use['s8_params']}, "
              f"float copies of their shapes in the program: {use['float_copies_of_s8_shapes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
