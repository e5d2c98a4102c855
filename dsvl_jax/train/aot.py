r"""Ahead-of-time compile of a training config's train step for a Cloud TPU slice, on a CPU-only host.

    python tools/aot_compile.py --config configs/deepseek_vl_7b.py:stage2 --topology v5p:4x4x4 \
        [--mesh data=1,fsdp=-1,tensor=1] [--batch N] [--grad-accum K] [--remat full] [--step-time S] \
        [--remat-sam full --remat-siglip dots --remat-llm dots_no_batch] [--slices N]

`--slices N` compiles for N copies of the slice joined by DCN (`get_topology_desc(..., num_slices=N)`, the
mesh's data axis across the slices, `dsvl_jax.sharding.make_mesh(slices=N)`) and also prints the bytes each
chip sends across DCN per step (`dsvl_jax.train.hlo_collectives`).

(`tools/aot_compile.py` is the entry point; this module is its library: `compile_plan`, `abstract_batch`.)
libtpu describes the slice (`jax.experimental.topologies`), the step is built exactly as the trainer
builds it (`make_train_step` over the same `TrainState`, `donate_argnums=0`) and lowered on abstract
inputs only: the state is `dsvl_jax.state.abstract_state` (ShapeDtypeStructs carrying the params' and
optimizer state's shardings), the batch follows the data pipeline's contract. Nothing of the model is
allocated on the host. Prints, per chip: XLA's memory plan (arguments, outputs, aliased
(donated), temp, total vs the generation's HBM) and FLOPs: XLA's cost analysis (per chip; it counts a
while-loop body once, so a scanned model reads as about one layer), the jaxpr count (scan bodies times
their length) and the analytic count (`dsvl_jax.train.flops`), then the MFU at --step-time or the step
time that 50% MFU needs.

The SAM global attention is compiled as `--sam-impl` says (default pallas, what a TPU runs), not as
`sam_attention_impl="auto"`, which resolves on the *host's* backend (CPU here). XLA cannot partition the
Mosaic kernel itself, so under a mesh it runs per shard, wrapped in a shard_map over images and heads
(`dsvl_jax.ops.relpos_attention`): sharded compiles work with pallas as with blockwise, and --use-chips 1
compiles a single-chip step.
v5p-N counts TensorCores: v5p-256 = 128 chips = topology 4x4x8.

Measured on the 2-core / 24 GiB CPU host (jax 0.10.2, libtpu 0.0.42.1): DeepSeek-VL 7B stage 2 at the
paper's global batch, 2,304 rows x 4,096 tokens, 4 image slots a row (f32 pixels at 384 and 1,024 px:
57 MB a row), bf16 compute, fp32 params and Adam, 30 LM layers, --sam-impl blockwise (the XLA path;
the per-shard Pallas kernel needs less HBM):

    python tools/aot_compile.py --config configs/deepseek_vl_7b.py:stage2 --topology v5p:4x4x8 \
        --mesh data=1,fsdp=-1,tensor=1 --grad-accum 18 --sam-impl blockwise

  slice (chips)     mesh      grad_accum  rows/chip  remat          per chip, GiB: args+out-alias+temp = total
  v5p:4x4x8 (128)   fsdp=128      18         1       dots_no_batch  1.59 + 0.63 - 0.63 + 21.1 = 23.0  fits (863 s)
  v5p:4x4x8 (128)   fsdp=128       6         3       dots_no_batch  1.59 + 0.63 - 0.63 + 59.9 = 61.7  fits
  v5p:4x4x4 (64)    fsdp=64       18         2       dots_no_batch  3.18 + 1.25 - 1.25 + 41.8 = 45.2  fits (838 s)
  v5p:2x2x2 (8)     fsdp=8       144         2       dots_no_batch  25.3 + 9.89 - 9.89 + 61.2 = 86.6  fits: smallest
  v5p:2x2x1 (4)     fsdp=4       576         1       full           50.6 + 19.8 - 19.8 + 47.2 = 97.9  does not fit
  v5p:2x2x1 (4)     fsdp=4       576         1       dots_no_batch  temporaries alone 96.6 GB: does not fit
  v5p:2x2x2 (8)     fsdp=8       288         1       dots_no_batch  temporaries 376 GB (full remat: 367 GB)
  v5p:2x2x4 (16)    fsdp=16      144         1       dots_no_batch  temporaries 195 GB
  v5p:2x2x2 (8)     fsdp=8       288         1       dots_no_batch  text-only step: 9.92 + 0 + 33.4 = 43.4  fits
The 118-376 GB rows (one row per chip per micro-batch on 8 and 16 chips) were not replicated pixels but
the ViT patch embedding: an `nn.Conv` on NHWC images, whose C = 3 channel dim TPU pads to 128 lanes (43x
the bytes), and XLA held that for every image of the step; the temporaries grew with the image slots and
the micro-batches (about 0.3 GB an image) and vanished without images. The patch embedding is now a
patchify + matmul (`dsvl_jax.models.common.PatchEmbed`, same params; the 768-wide patch vectors need no
padding). The same layout afterwards (blockwise SAM, 30 layers):
  v5p:2x2x2 (8)     fsdp=8       288         1       dots_no_batch  25.3 + 9.89 - 9.89 + 41.6 = 67.2  fits (1,209 s)
(before: temporaries 376 GB; 1 LM layer: 351 GB before, 16.7 GiB after). A 128-chip compile takes 15-30 min
and 5.3 GB of host RAM; one that does not fit fails in about a minute.

FLOPs per step (analytic = the jaxpr count, exactly): model 4.385e17 (causal-halved 4.100e17; LLM 91%,
lm_head 5.4%, SAM 2.2%, SigLIP 0.8%, aligner 0.15%); hardware 4.655e17 with dots_no_batch, 5.545e17 with
full remat; XLA's cost analysis reads 1.5e15 (each loop body once). 50% MFU on 128 chips needs 14.9 s a
step (4,939 tokens/s/chip): the 42k steps of stage 2 take 7.3 days (8.1 at 45% MFU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from dsvl_jax import sharding
from dsvl_jax.config import REMAT_POLICIES
from dsvl_jax.data.transforms import DEFAULT_TASKS
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import abstract_state, param_shardings
from dsvl_jax.train import flops, hlo_collectives, lora_run, stages, validate
from dsvl_jax.train.aot_dry_run import DRY_RUN_BANNER, DRY_RUN_HELP, DRY_RUN_SEQ_LEN, dry_run_batch, tiny_model_like
from dsvl_jax.train.config_files import load_config
from dsvl_jax.train.optimizer import make_optimizer
from dsvl_jax.train.step import jit_train_step, make_train_step

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def parse_mesh(text: str | None, config) -> tuple[int, int, int]:
    sizes = dict(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)
    for item in filter(None, (text or "").split(",")):
        key, _, val = item.partition("=")
        if key not in sizes or not val.lstrip("-").isdigit():
            raise SystemExit(f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N (one may be -1)")
        sizes[key] = int(val)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def describe_topology(name: str, use_chips: int | None = None, slices: int = 1):
    """(devices, generation, chips) of a TPU slice such as 'v5p:4x4x4' (`slices` of them: chips of all;
    their devices carry `slice_index`); `use_chips`: only the first chips of one slice."""
    gen, _, shape = name.partition(":")
    if gen not in HBM_GIB or not shape:
        raise SystemExit(f"--topology {name!r}: expected <generation>:<AxBxC> with generation in {sorted(HBM_GIB)}")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=slices)
    except Exception as e:  # libtpu missing, or a shape it does not know
        raise SystemExit(f"--topology {name}: libtpu cannot describe it ({type(e).__name__}: {e})")
    devices, chips = list(topo.devices), math.prod(int(x) for x in shape.split("x"))
    if use_chips:
        if slices > 1:
            raise SystemExit(f"--use-chips with --slices {slices}: compile whole slices")
        if not 0 < use_chips <= chips:
            raise SystemExit(f"--use-chips {use_chips}: the slice {name} has {chips} chips")
        devices, chips = devices[:len(devices) // chips * use_chips], use_chips
    return devices, gen, chips * slices


def abstract_batch(cfg, mesh, batch: int, seq_len: int, images_per_row: int, text_only: bool):
    """The data pipeline's batch contract as ShapeDtypeStructs, rows over (data, fsdp)."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    out = {k: sds((batch, seq_len), jnp.int32) for k in ("input_ids", "targets", "positions", "segment_ids",
                                                         "task_ids")}
    out["loss_mask"] = sds((batch, seq_len), jnp.float32)
    if not text_only:
        s = cfg.siglip.image_size
        out["pixel_values"] = sds((batch, images_per_row, 3, s, s), jnp.float32)
        if cfg.sam is not None:
            hs = cfg.sam.image_size
            out["high_res_pixel_values"] = sds((batch, images_per_row, 3, hs, hs), jnp.float32)
        out["image_mask"] = sds((batch, images_per_row), jnp.bool_)
    return out


class DoesNotFit(RuntimeError):
    """The TPU compiler could not place the step's buffers in one chip's HBM (its message says by how much)."""


@dataclasses.dataclass
class Plan:
    """What one AOT compile found; all memory figures per chip, FLOPs per step."""
    topology: str
    chips: int
    devices: int
    mesh: dict
    batch: int
    seq_len: int
    grad_accum: int
    remat: str
    remat_towers: dict  # tower -> the policy it compiled with
    slices: int
    layers: int
    images_per_row: int
    argument_gib: float
    output_gib: float
    alias_gib: float
    temp_gib: float
    total_gib: float
    hbm_gib: float
    xla_flops: float  # XLA cost analysis, whole slice (per chip x devices); loop bodies once
    jaxpr_flops: float  # matmul/conv FLOPs of the traced step, scans x length (Pallas by cost estimate)
    model_flops: float  # analytic, full T x T attention, no recompute (MFU's numerator)
    model_flops_causal: float
    hardware_flops: float  # analytic + remat / loss-chunk recompute + kernel overhead
    peak_flops_per_device: float | None
    compile_s: float
    dcn: dict | None = None  # slices > 1: the DCN-crossing collectives (dsvl_jax.train.hlo_collectives.dcn_summary)
    compiled: object = dataclasses.field(default=None, repr=False, compare=False)  # jax Compiled; not in JSON
    dry_run: bool = False  # a tiny model of the config's layout at tiny shapes (dsvl_jax.train.aot_dry_run)

    @property
    def fits(self) -> bool:
        return self.total_gib < self.hbm_gib

    def step_time_for_mfu(self, target: float = 0.5) -> float | None:
        if not self.peak_flops_per_device:
            return None
        return self.model_flops / (target * self.devices * self.peak_flops_per_device)


def compile_plan(config, topology: str, mesh_sizes=None, *, batch=None, seq_len=None, grad_accum=None,
                 remat=None, layers=None, images_per_row=None, text_only=False, sam_impl="pallas",
                 count_jaxpr=True, use_chips=None, slices=None, remat_towers=None, dry_run=False) -> Plan:
    """Compile `config`'s train step for `topology` (mesh, batch and the rest default to the config's;
    `slices` copies of the slice joined by DCN, the mesh sizes then per slice; `remat_towers`:
    {'sam'|'siglip'|'llm': policy} over `remat`); raises SystemExit naming the flag for bad arguments and
    `DoesNotFit` when the step exceeds HBM. `dry_run`: every argument checked at the config's shapes, then
    compiled for a tiny model of the same layout at tiny shapes (`dsvl_jax.train.aot_dry_run`)."""
    slices = slices or config.mesh.get("slices", 1)
    devices, gen, chips = describe_topology(topology, use_chips, slices)
    cfg = validate.model_config(config)
    over = {"sam_attention_impl": sam_impl} if cfg.sam is not None else {}
    if remat:
        over["remat_policy"] = remat
    for tower, policy in (remat_towers or {}).items():
        if tower not in ("sam", "siglip", "llm"):
            raise SystemExit(f"--remat-{tower}: no such tower (sam, siglip, llm)")
        over[f"remat_policy_{tower}"] = policy
    if layers is not None and layers < 1:
        raise SystemExit(f"--layers {layers}: must be at least 1")
    if layers:
        over["text"] = dataclasses.replace(cfg.text, num_hidden_layers=layers)
    cfg = cfg.replace(**over)
    if seq_len is not None and seq_len < 1:
        raise SystemExit(f"--seq-len {seq_len}: must be at least 1")
    batch = batch or config.batch_size
    seq_len = seq_len or config.seq_len
    grad_accum = grad_accum or config.grad_accum
    images_per_row = images_per_row or config.data.max_images_per_row
    data, fsdp, tensor = mesh_sizes or (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    try:
        mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices, slices=slices)
    except ValueError as e:
        raise SystemExit(f"--mesh / --slices: {e}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % (shards * grad_accum):
        raise SystemExit(f"--batch {batch} is not divisible by data x fsdp ({shards}) x grad_accum ({grad_accum})")
    if dry_run:  # everything above checked at the config's shapes; compile the same layout, tiny
        real_layers = cfg.text.num_hidden_layers
        cfg = tiny_model_like(cfg)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=min(real_layers,
                                                                                    cfg.text.num_hidden_layers)))
        batch, seq_len = dry_run_batch(shards, grad_accum), DRY_RUN_SEQ_LEN

    spec = lora_run.spec(config)  # a LoRA config compiles its LoRA step (adapters in the state)
    patterns = lora_run.base_patterns(config) if spec else stages.patterns_for(config.stage, tuple(config.trainable))
    _, abstract = param_shardings(cfg, mesh)
    mask = stages.trainable_mask(abstract, patterns)
    tx, lr_fn = make_optimizer(config.optimizer, config.total_steps, mask)
    num_tasks = 1 + len(DEFAULT_TASKS) + len([t for t in config.data.tasks if t not in DEFAULT_TASKS])
    step = make_train_step(DeepseekVL(cfg), tx, mask, lr_fn, num_tasks=num_tasks, grad_accum=grad_accum,
                           loss_chunk=config.loss_chunk, text_only=text_only, lora_spec=spec, seed=config.seed)
    state = abstract_state(cfg, mesh, tx, mask, spec)
    inputs = abstract_batch(cfg, mesh, batch, seq_len, images_per_row, text_only)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        jitted = jit_train_step(step, state)  # the trainer's program
        try:
            compiled = jitted.lower(state, inputs).compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise DoesNotFit(f"{topology}, mesh {dict(mesh.shape)}, batch {batch}, grad_accum {grad_accum}, remat "
                             f"{cfg.remat_policy}: {e}") from None
        compile_s = time.perf_counter() - t0
        jaxpr_flops = flops.traced_matmul_flops(jitted, state, inputs) if count_jaxpr else float("nan")
    dcn = hlo_collectives.dcn_summary(compiled.as_text(), slices) if slices > 1 else None
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    gib = lambda b: b / 2 ** 30
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes \
        + mem.generated_code_size_in_bytes
    analytic = flops.train_flops_per_step(cfg, batch_rows=batch, seq_len=seq_len,
                                          images_per_step=0 if text_only else batch * images_per_row,
                                          trainable_patterns=patterns, text_only=text_only,
                                          loss_chunk=config.loss_chunk, num_tasks=num_tasks, sam_impl=sam_impl,
                                          lora_spec=spec)
    per_chip_devices = len(devices) // chips  # v4 topologies list both TensorCores of a chip
    peak = flops.peak_flops_per_device(devices[0].device_kind)
    return Plan(topology=topology, chips=chips, devices=len(devices), mesh=dict(mesh.shape), batch=batch,
                seq_len=seq_len, grad_accum=grad_accum, remat=cfg.remat_policy,
                remat_towers={t: cfg.tower_remat(t) for t in ("sam", "siglip", "llm")}, slices=slices,
                layers=cfg.text.num_hidden_layers,
                images_per_row=0 if text_only else images_per_row,
                argument_gib=gib(mem.argument_size_in_bytes), output_gib=gib(mem.output_size_in_bytes),
                alias_gib=gib(mem.alias_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
                total_gib=gib(total) * per_chip_devices, hbm_gib=float(HBM_GIB[gen]),
                xla_flops=float(cost.get("flops", float("nan"))) * len(devices), jaxpr_flops=jaxpr_flops,
                model_flops=analytic["total"], model_flops_causal=analytic["total_causal"],
                hardware_flops=analytic["total_hardware"],
                peak_flops_per_device=None if peak is None else peak / per_chip_devices, compile_s=compile_s,
                dcn=dcn, compiled=compiled, dry_run=dry_run)


def format_plan(p: Plan, step_time: float | None = None) -> str:
    towers = ", ".join(f"{t} {v}" for t, v in p.remat_towers.items() if v != p.remat)
    lines = [DRY_RUN_BANNER] * p.dry_run + [
        f"{p.slices} x " * (p.slices > 1) +
        f"{p.topology}: {p.chips} chips ({p.devices} devices), mesh {p.mesh}; batch {p.batch} x {p.seq_len} tokens, "
        f"{p.images_per_row} image slot(s)/row, grad_accum {p.grad_accum}, remat {p.remat}{f' ({towers})' if towers else ''}, {p.layers} LM layers "
        f"(compiled in {p.compile_s:.0f} s)",
        f"  memory per chip: arguments {p.argument_gib:.3g} GiB, outputs {p.output_gib:.3g}, aliased (donated) "
        f"{p.alias_gib:.3g}, temp {p.temp_gib:.3g} -> total {p.total_gib:.3g} GiB of {p.hbm_gib:.0f} GiB HBM "
        f"({'fits' if p.fits else 'DOES NOT FIT'})",
        f"  FLOPs per step: analytic model {p.model_flops:.4g} (causal-halved {p.model_flops_causal:.4g}), "
        f"analytic hardware {p.hardware_flops:.4g}, jaxpr matmuls {p.jaxpr_flops:.4g}, "
        f"XLA cost analysis {p.xla_flops:.4g} (loop bodies counted once)",
    ]
    if p.dcn is not None:
        lines.append("  " + hlo_collectives.format_summary(p.dcn))
    if p.peak_flops_per_device:
        peak = p.peak_flops_per_device * p.devices
        if step_time:
            lines.append(f"  at {step_time:g} s/step: MFU {p.model_flops / step_time / peak:.1%} "
                         f"(causal-halved {p.model_flops_causal / step_time / peak:.1%}), "
                         f"HFU {p.hardware_flops / step_time / peak:.1%}")
        else:
            lines.append(f"  50% MFU needs {p.step_time_for_mfu(0.5):.2f} s/step "
                         f"({p.batch * p.seq_len / p.step_time_for_mfu(0.5) / p.chips:,.0f} tokens/s/chip)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config file[:variant]")
    ap.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1, v5p:4x4x8, v5e:4x4, v6e:4x4")
    ap.add_argument("--mesh", help="data=N,fsdp=N,tensor=N (default: the config's; one may be -1)")
    ap.add_argument("--batch", type=int, help="global batch in rows (default: the config's)")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--remat", choices=REMAT_POLICIES, help="every tower's policy (default: the config's)")
    for tower in ("sam", "siglip", "llm"):
        ap.add_argument(f"--remat-{tower}", choices=REMAT_POLICIES, help=f"the {tower} tower's own policy")
    ap.add_argument("--slices", type=int, help="this many copies of --topology joined by DCN (multi-slice); the "
                    "mesh sizes are then per slice and the data axis spans the slices")
    ap.add_argument("--layers", type=int, help="LM layers (fewer: to estimate compile cost / scaling)")
    ap.add_argument("--images-per-row", type=int, help="image slots per row (default: data.max_images_per_row)")
    ap.add_argument("--text-only", action="store_true", help="compile the text-only step (no vision towers)")
    ap.add_argument("--sam-impl", default="pallas", choices=("pallas", "blockwise", "reference"))
    ap.add_argument("--use-chips", type=int, help="compile for the first N chips of the slice only")
    ap.add_argument("--step-time", type=float, help="seconds per step: report the MFU it means")
    ap.add_argument("--no-jaxpr-count", action="store_true", help="skip the (trip-count aware) jaxpr FLOP count")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except FileNotFoundError as e:
        raise SystemExit(f"--config {e}") from None
    try:
        plan = compile_plan(config, args.topology, parse_mesh(args.mesh, config), batch=args.batch,
                            seq_len=args.seq_len, grad_accum=args.grad_accum, remat=args.remat, layers=args.layers,
                            images_per_row=args.images_per_row, text_only=args.text_only, sam_impl=args.sam_impl,
                            count_jaxpr=not args.no_jaxpr_count, use_chips=args.use_chips, slices=args.slices,
                            remat_towers={t: getattr(args, f"remat_{t}") for t in ("sam", "siglip", "llm")
                                          if getattr(args, f"remat_{t}")}, dry_run=args.dry_run)
    except DoesNotFit as e:
        print(f"DOES NOT FIT: {e}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"fits": False, "error": str(e)}, f, indent=2)
        return 1
    except NotImplementedError as e:
        print(f"aot_compile: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.step_time))
    if args.json:
        with open(args.json, "w") as f:
            fields = {d.name: getattr(plan, d.name) for d in dataclasses.fields(plan) if d.name != "compiled"}
            json.dump(dict(fields, fits=plan.fits, step_time_for_50pct_mfu=plan.step_time_for_mfu()), f, indent=2)
    return 0 if plan.fits else 1

