"""`dsvl-convert SRC DST --to hf|official|orbax|peft`: checkpoints between an Orbax training checkpoint, an
HF-port folder and an official-layout folder, in any direction (also `python tools/convert_checkpoint.py`).
A LoRA run's workdir exports its adapters as a PEFT adapter folder (`--to peft`, for transformers + peft) or
merged into full weights (`--to hf|official --merge`); `--to hf|official` alone writes its base params.

The source layout is detected (Orbax workdir / checkpoints dir / step dir; else config.json's
model_type). PyTorch ↔ PyTorch streams one tensor at a time through the key map; Orbax sources are
restored params-only onto the host. The destination is written into a temporary folder beside it and
renamed at the end (missing parent folders are created; permissions follow the umask); bad input gets a
one-line error (exit code 2) and nothing is written. An HF-port destination is complete: tokenizer
files, processor_config.json and chat_template.jinja beside the weights (`AutoProcessor` loads it).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

import jax

from dsvl_jax.convert import lora_orbax, orbax_io, peft_io, stream
from dsvl_jax.convert.export import (DestinationExists, dequantized, has_tokenizer, plan_tensors, tensor_plan,
                                     write_folder)
from dsvl_jax.convert.folders import read_config
from dsvl_jax.convert.safetensors_io import INDEX_NAME, MAX_SHARD_BYTES, SINGLE_NAME
from dsvl_jax.errors import CheckpointError, ConfigError
from dsvl_jax.models.quant import quantize_params
from dsvl_jax.state import param_shapes
from dsvl_jax.train.stages import UNUSED, path_matches

TARGETS = ("hf", "official", "orbax", "peft")
QUANTIZE = ("int8",)
DTYPES = ("bfloat16", "float32")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' → 5e9 bytes (HF's decimal units; KiB/MiB/GiB binary); a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r} must be positive")
    return n


def detect_source(path: str) -> str:
    """'orbax', 'hf' or 'official'; raises with what was found when the folder is none of them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"source {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"source {path!r} is a file; expected a checkpoint directory")
    orbax = orbax_io.is_orbax(path)
    torch = any(os.path.exists(os.path.join(path, n)) for n in ("config.json", SINGLE_NAME, INDEX_NAME))
    if orbax and torch:
        raise CheckpointError(f"{path}: mixed layouts: holds both a PyTorch checkpoint (config.json/safetensors) and "
                              f"an Orbax checkpoint; point at one of them")
    if orbax:
        return "orbax"
    if not torch:
        listing = sorted(os.listdir(path))
        raise CheckpointError(f"{path}: no checkpoint found: no config.json + safetensors and no Orbax "
                              f"checkpoints/<step>/state ({'empty directory' if not listing else listing[:6]})")
    layout, _, _ = read_config(path)
    return layout


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    src_r, dst_r = os.path.realpath(src), os.path.realpath(dst)
    if dst_r == src_r or dst_r.startswith(src_r + os.sep) or src_r.startswith(dst_r + os.sep):
        raise DestinationExists(f"destination {dst!r} overlaps the source {src!r}; choose another folder")
    if os.path.exists(dst) and not overwrite:
        raise DestinationExists(f"destination {dst!r} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    while not os.path.exists(parent):  # missing parents are created (by the writer, once the source checks out)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{parent!r} is a file, so it cannot hold the destination {dst!r}")


def convert(src: str, dst: str, to: str, *, dtype: Optional[str] = None, overwrite: bool = False,
            step: Optional[int] = None, max_shard_bytes: Optional[int] = None, merge: bool = False,
            quantize: Optional[str] = None) -> str:
    """Convert `src` (any supported layout, detected) to `to` at `dst`. Returns the destination path.

    `merge` (LoRA runs, to hf/official): the adapters merged into the kernels. quantize="int8" (Orbax
    destinations only) stores the LLM linears as int8 + per-channel scales (`dsvl_jax.models.quant`); an int8
    Orbax source written to a PyTorch layout is dequantized."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: expected one of {TARGETS}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {DTYPES}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r}: expected one of {QUANTIZE}")
    if quantize is not None and to != "orbax":
        raise ValueError(f"--quantize {quantize} needs --to orbax: the PyTorch layouts are written in float")
    kind = detect_source(src)
    check_destination(src, dst, overwrite)
    if step is not None and kind != "orbax":
        raise CheckpointError(f"--step applies to Orbax sources; {src} is a PyTorch ({kind}) folder")
    shard = max_shard_bytes or MAX_SHARD_BYTES
    lora_run = kind == "orbax" and lora_orbax.is_lora_run(src, step)
    if (to == "peft" or merge) and not lora_run:
        what = "not one" if kind == "orbax" else f"a PyTorch ({kind}) folder"
        raise CheckpointError(f"{'--to peft' if to == 'peft' else '--merge'} reads a LoRA run's Orbax workdir "
                              f"(lora.json beside model_config.json); {src} is {what}")
    if merge and to not in ("hf", "official"):
        raise ValueError(f"--merge writes full PyTorch weights: use it with --to hf or --to official, not --to {to}")
    if kind == "orbax":
        source = orbax_io.OrbaxSource(src, step)
        loc = source.location
        if lora_run and (to == "peft" or merge):
            spec, full = lora_orbax.read_meta(src, step)
            adapters = lora_orbax.read_adapters(source)
            if to == "peft":
                full_paths = [p for p in param_shapes(source.config)
                              if path_matches(p, full) and not path_matches(p, UNUSED)]
                return peft_io.write_peft(dst, source.config, spec, adapters, full_paths=full_paths,
                                          array_of=source.array_of, overwrite=overwrite)
            source = lora_orbax.MergedSource(source, spec, adapters)
        if to == "orbax":
            cfg = source.config if dtype is None else source.config.replace(param_dtype=dtype)
            params = source.params(dtype)
            if quantize and cfg.quantization != "int8":
                cfg, params = cfg.replace(quantization="int8"), quantize_params(params)
            return orbax_io.save_orbax_params(dst, cfg, params, step=loc.step,
                                              overwrite=overwrite, side_files_from=loc.workdir)
        if source.config.quantization == "int8":  # dequantized: one float copy on the host
            cfg, params = dequantized(source.config, source.params(), dtype)
            plan, produce = tensor_plan(cfg, params, to, dtype)
            return write_folder(dst, cfg, to, plan, produce, overwrite=overwrite, max_shard_bytes=shard,
                                side_files_from=loc.workdir)
        plan, produce = plan_tensors(source.config, to, source.shape_of, source.dtype_of, source.array_of, dtype)
        return write_folder(dst, source.config, to, plan, produce, overwrite=overwrite, max_shard_bytes=shard,
                            side_files_from=loc.workdir)
    if to == "orbax":
        with stream.TorchSource(src) as source:
            params = source.params(dtype)
            d = dtype or source.dtype_name()
            cfg = source.config.replace(dtype=d, param_dtype=d)
            if quantize:
                cfg, params = cfg.replace(quantization="int8"), quantize_params(params)
            return orbax_io.save_orbax_params(dst, cfg, params, step=0, overwrite=overwrite,
                                              side_files_from=source.path)
    return stream.convert_torch(src, dst, to, dtype=dtype, overwrite=overwrite, max_shard_bytes=shard)


def is_int8_orbax(path: str) -> bool:
    return orbax_io.is_orbax(path) and orbax_io.read_model_config(orbax_io.locate(path).config_path).quantization == "int8"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsvl-convert", description="Convert DeepSeek-VL checkpoints between an Orbax training checkpoint, "
        "the HF transformers port and the official deepseek-ai layout (source layout auto-detected).")
    p.add_argument("src", help="source: HF-port or official folder, or an Orbax workdir / checkpoints dir / step dir")
    p.add_argument("dst", help="destination folder (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=TARGETS, help="destination layout")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep each tensor's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--step", type=int, default=None, help="Orbax source: the step to read (default: latest)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA run: write full weights with the adapters merged in (with --to hf or official)")
    p.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="largest safetensors shard, e.g. 5GB (default) or 500MB")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="--to orbax: store the LLM linears as int8 with per-output-channel scales")
    return p


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Exit status 0; 2 for input that cannot be converted (named in one line on stderr); 1 when writing
    fails (disk full, permissions), also in one line: no traceback for what the user can fix."""
    args = build_parser().parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:  # conversion is host work: never grab an accelerator
        os.environ["JAX_PLATFORMS"] = "cpu"
        if jax.config.jax_platforms is None:  # jax read the environment on import; takes effect until first use
            jax.config.update("jax_platforms", "cpu")
    try:
        out = convert(args.src, args.dst, args.to, dtype=args.dtype, overwrite=args.overwrite, step=args.step,
                      max_shard_bytes=args.max_shard_size, merge=args.merge, quantize=args.quantize)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"dsvl-convert: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dsvl-convert: error: writing {args.dst}: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"dsvl-convert: wrote {out} ({args.to}{', merged' if args.merge else ''}{', int8' if args.quantize else ''})")
    if args.to in ("hf", "official", "orbax") and not args.merge and lora_orbax.is_lora_run(args.src, args.step):
        print(f"dsvl-convert: note: {args.src} is a LoRA run; {out} holds its base params without the adapters "
              "(--merge merges them in, --to peft writes them as a PEFT adapter)", file=sys.stderr)
    if args.to not in ("orbax", "peft") and is_int8_orbax(args.src):
        print(f"dsvl-convert: note: {args.src} holds int8 weights; {out} has them dequantized (int8 × scale) "
              f"to {args.dtype or 'float32'}", file=sys.stderr)
    if args.to == "hf" and not has_tokenizer(out):
        print(f"dsvl-convert: note: {args.src} has no tokenizer files beside its config, so {out} has none; "
              "transformers' AutoProcessor needs tokenizer.json (or tokenizer.model) with "
              "tokenizer_config.json copied into it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
