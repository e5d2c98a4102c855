r"""Compile every per-slice config (configs/tpu/*.py, every variant) for its TPU topology, ahead of time, on
a CPU-only host through libtpu, and print what each needs per chip and what it should cost:

    python tpu/compile_all.py                        # all, one fresh process per compile
    python tpu/compile_all.py --only v5p_64:7b_stage2 --json /tmp/v5p_64.json
    python tpu/compile_all.py --only v5p_64 --dry-run  # the same variants, a tiny model of their layout, in seconds

Per variant: mesh, micro-batch, XLA's per-chip memory plan against the chip's HBM (the check to run
before paying for a slice), the analytic model FLOPs per step (`dsvl_jax.train.flops`, MFU's numerator)
and the expected step time at an assumed MFU (--mfu, default 40%: below the 45-70% MaxText publishes for
dense LLMs on these chips, as this step also runs two vision towers, blockwise SAM attention and an
FSDP all-gather per micro-batch), with the HFU (model + remat recompute FLOPs) that time means. XLA's own
cost model is no help here: its `optimal_seconds` for these programs is negative (jax 0.10.2, libtpu
0.0.42.1), and it counts each loop body once.

Each compile runs in its own process (the 7B on a pod-sized topology needs a few GiB of host memory and
10-30 min on 2 cores); a variant that does not fit is reported, not fatal. `--dry-run` compiles each variant
in this process, for a tiny model of its layout at tiny shapes (`dsvl_jax.train.aot_dry_run`).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; never try to run on one (set before jax loads)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles may hold libtpu at once

import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from dsvl_jax import sharding  # noqa: E402
from dsvl_jax.train import aot  # noqa: E402
from dsvl_jax.train.aot_dry_run import DRY_RUN_BANNER, DRY_RUN_HELP  # noqa: E402
from dsvl_jax.train.config_files import config_module  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = os.path.join(REPO, "configs", "tpu")


def slice_files() -> dict[str, str]:
    return {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(SLICES, "*.py")))
            if os.path.basename(p) != "__init__.py"}


def entries(only: list[str] | None = None) -> list[tuple[str, str]]:
    """(slice name, variant) pairs: all of them, or those named as slice[:variant]."""
    files, out = slice_files(), []
    for name, path in files.items():
        for variant in config_module(path).LAYOUTS:
            out.append((name, variant))
    if only:
        wanted = []
        for o in only:
            name, _, variant = o.partition(":")
            if name not in files:
                raise SystemExit(f"--only {o}: no configs/tpu/{name}.py (have {', '.join(files)})")
            hit = [e for e in out if e[0] == name and (not variant or e[1] == variant)]
            if not hit:
                raise SystemExit(f"--only {o}: {name} has variants {[v for n, v in out if n == name]}")
            wanted += hit
        out = wanted
    return out


def _mesh_over_tensorcores():
    """libtpu describes a v4 slice per TensorCore (two devices a chip), while jax.make_mesh, and so
    `dsvl_jax.sharding.make_mesh`, insists on one device a chip (megacore: what a v4 VM runs). For the
    compile only, lay the mesh over the TensorCores in device order when make_mesh refuses; a chip's two
    programs together stand for its megacore program (aot_compile adds their memory up per chip)."""
    strict = sharding.make_mesh
    if getattr(strict, "over_tensorcores", False):  # already patched (dry runs compile in one process)
        return

    def make_mesh(data=-1, fsdp=1, tensor=1, devices=None, slices=1):
        try:
            return strict(data, fsdp, tensor, devices=devices, slices=slices)
        except AssertionError as e:
            if "one device per chip" not in str(e) or slices > 1:
                raise
        sizes = [data, fsdp, tensor]
        if -1 in sizes:
            sizes[sizes.index(-1)] = len(devices) // math.prod(s for s in sizes if s != -1)
        return Mesh(np.array(devices).reshape(sizes), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)

    make_mesh.over_tensorcores = True
    sharding.make_mesh = make_mesh


def compile_one(name: str, variant: str, mfu: float, dry_run: bool = False) -> dict:
    """Compile one variant in this process (`dry_run`: a tiny model of its layout); the figures as a dict."""
    _mesh_over_tensorcores()
    mod = config_module(slice_files()[name])
    config = mod.get_config(variant)
    sam = config.model.get("sam") is not None
    row = dict(slice=name, variant=variant, accelerator=mod.ACCELERATOR, topology=mod.TOPOLOGY,
               mesh=dict(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor),
               batch=config.batch_size, seq_len=config.seq_len, grad_accum=config.grad_accum,
               remat=config.model.remat_policy, total_steps=config.total_steps)
    try:
        plan = aot.compile_plan(config, mod.TOPOLOGY, sam_impl=config.model.sam_attention_impl if sam else "pallas",
                                count_jaxpr=False, dry_run=dry_run)
    except aot.DoesNotFit as e:
        return dict(row, fits=False, error=str(e))
    peak = (plan.peak_flops_per_device or float("nan")) * plan.devices
    step_s = plan.model_flops / (mfu * peak)
    return dict(row, fits=plan.fits, chips=plan.chips, devices=plan.devices, mesh=plan.mesh, batch=plan.batch,
                seq_len=plan.seq_len, dry_run=dry_run,
                **{key: float(f"{value:.3g}") if dry_run else round(value, 2)  # a tiny model's: 3 digits
                   for key, value in (("memory_gib", plan.total_gib), ("temp_gib", plan.temp_gib),
                                      ("argument_gib", plan.argument_gib))}, hbm_gib=plan.hbm_gib, peak_flops=peak,
                model_flops=plan.model_flops, hardware_flops=plan.hardware_flops, assumed_mfu=mfu,
                est_step_s=step_s, est_hfu=plan.hardware_flops / step_s / peak,
                tokens_per_s_per_chip=plan.batch * plan.seq_len / step_s / plan.chips,
                compile_s=round(plan.compile_s))


def format_row(r: dict) -> str:
    head = (f"{r['slice']:>8} {r['variant']:<11} {r['topology']:<10} mesh {r['mesh']} "
            f"batch {r['batch']}x{r['seq_len']} in {r['grad_accum']} micro-batches, remat {r['remat']}")
    if "error" in r:
        return f"{head}\n         {'DOES NOT FIT' if r.get('fits') is False else 'FAILED'}: {r['error'][:300]}"
    gib = ".3g" if r.get("dry_run") else ".1f"
    return (f"{head}\n         memory {r['memory_gib']:{gib}} of {r['hbm_gib']:.0f} GiB per chip "
            f"({'fits' if r['fits'] else 'DOES NOT FIT'}; temp {r['temp_gib']:{gib}}); model {r['model_flops']:.3g} "
            f"FLOP/step; at {r['assumed_mfu']:.0%} MFU {r['est_step_s']:.1f} s/step (HFU {r['est_hfu']:.0%}, "
            f"{r['tokens_per_s_per_chip']:,.0f} tokens/s/chip); compiled in {r['compile_s']} s")


def markdown(rows: list[dict]) -> str:
    """The figures as a Markdown table (tpu/README.md carries one)."""
    out = ["| slice | variant | mesh (data, fsdp, tensor) | rows x tokens / micro-batches | remat | GiB a chip "
           "(HBM) | model FLOP/step | s/step at MFU | tokens/s/chip | paper's steps take |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mesh"]
        head = (f"| {r['slice']} | {r['variant']} | {m.get('data')}, {m.get('fsdp')}, {m.get('tensor')} | "
                f"{r['batch']:,} x {r['seq_len']:,} / {r['grad_accum']} | {r['remat']} | ")
        if "error" in r:
            out.append(head + f"does not fit: {r['error'].split(':')[-1].strip()[:80]} | | | | |")
            continue
        days = r["est_step_s"] * r.get("total_steps", float("nan")) / 86400
        out.append(head + f"{r['memory_gib']:.1f} ({r['hbm_gib']:.0f}) | {r['model_flops']:.3g} | "
                   f"{r['est_step_s']:.1f} at {r['assumed_mfu']:.0%} | {r['tokens_per_s_per_chip']:,.0f} | "
                   f"{r.get('total_steps', 0):,} in {days:.1f} days |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="slice[:variant], e.g. v5p_64:7b_stage2 (repeatable)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed MFU for the expected step time")
    ap.add_argument("--markdown", action="store_true", help="also print the figures as a Markdown table")
    ap.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP + "; every compile in this process")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # slice:variant, in this process (the worker mode)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        name, variant = args.one.split(":")
        with open(args.out, "w") as f:
            json.dump(compile_one(name, variant, args.mfu), f)
        return 0
    rows = []
    if args.dry_run:
        print(DRY_RUN_BANNER, flush=True)
    for name, variant in entries(args.only):
        if args.dry_run:
            rows.append(compile_one(name, variant, args.mfu, dry_run=True))
            print(format_row(rows[-1]), flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", f"{name}:{variant}",
                                   "--out", tmp.name, "--mfu", str(args.mfu)], capture_output=True, text=True)
            if proc.returncode == 0:
                row = json.load(open(tmp.name))
            else:
                tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
                row = dict(slice=name, variant=variant, topology="?", mesh={}, batch=0, seq_len=0, grad_accum=0,
                           remat="?", error=" | ".join(tail))
        rows.append(row)
        print(format_row(row), flush=True)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r.get("fits") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
