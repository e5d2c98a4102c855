r"""The accelerator check: one script, one table, at most 8 minutes on one H100 or H200.

Rows (key, value, unit, detail), every one timed after warm-up with block_until_ready (torch: synchronize):
- train.*: the project's train step (`make_train_step` over `make_state` / `init_params`, `make_optimizer`'s
  AdamW, a one-device mesh) on the 1.3B shapes with random weights: bf16 compute on fp32 master weights,
  stage 2, 4,096 tokens and one image a row, as many rows as XLA's memory plan of the compiled step lets
  fill the card (`fit_rows`). MFU = analytic model FLOPs (`dsvl_jax.train.flops`) / step time / the chip's
  bf16 peak (where the peak table has none, the matmul rate measured here).
- sam.*: SAM-B at 1024 px, one global-attention block forward + backward (1 image x 12 heads x 4,096 tokens
  x 64, bf16; `benchmarks/relpos_attention.py`'s inputs and step): the blockwise XLA path against the
  reference with the materialised N x N bias, time and peak device memory (memory_stats; XLA's plan where
  there are none). The Pallas kernel is TPU-only and not run.
- vs_torch.*: the 1.3B forward (8 rows of 1 image + 64 tokens) and batch-1 greedy decode (32 new tokens)
  against transformers on the same device, bf16, the same random weights (`params_from_torch`), as ratios
  dsvl_jax / torch (below 1: dsvl_jax is faster); prefill and decode measured as `generate_vs_torch.py`
  does. Agreement: the share of greedy tokens equal before the first difference (bf16 may part them).

Each case runs in its own subprocess (a clean peak-memory counter; JAX preallocation is off beside torch)
under a time budget and a hard timeout: the run ends within --total-seconds (460) whatever happens. A case
that fails prints nan and FAILED, and the script exits 1.

On the GPU machine: its stock image (JAX 0.11 with CUDA, flax, optax, orbax, torch with CUDA, transformers)
holds every package this check imports; it imports none of grain, array_record, ml-collections,
tensorflow-datasets. Expected duration 5-7 minutes (8 at most):

    PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --json $OUT/device_check.json

Should an image version misbehave, bring setup.py's pins as wheels (here: `python3 -m pip download --no-deps
--only-binary=:all: -d .whl flax==0.12.8 optax==0.2.8`, `.whl` carried with the tree) and run:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --json $OUT/device_check.json

    python benchmarks/device_check.py --dry-run    # every case at tiny shapes on CPU, well under a minute
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, REPO):  # torch_peer / generate_vs_torch / relpos_attention; dsvl_jax and tests.helpers
    if _p not in sys.path:
        sys.path.insert(0, _p)

GIB = 2 ** 30

# Shapes per mode. "full": what the card runs; "dry": the tiny presets, on CPU.
SHAPES = {
    "full": dict(model="deepseek_vl_1p3b", stage=2, seq_len=4096, remat="dots_no_batch", loss_chunk=512,
                 first_rows=2, max_rows=64, train_steps=8, fill=0.85,
                 sam_grid=(64, 64), sam_heads=12, sam_head_dim=64, sam_repeats=20,
                 fwd_rows=8, text_tokens=64, new_tokens=32, repeats=5),
    "dry": dict(model="tiny_siglip", stage=2, seq_len=64, remat="dots_no_batch", loss_chunk=32,
                first_rows=2, max_rows=2, train_steps=3, fill=0.85,
                sam_grid=(8, 8), sam_heads=2, sam_head_dim=16, sam_repeats=3,
                fwd_rows=2, text_tokens=16, new_tokens=6, repeats=4),
}
# Case → (budget s for its own loops, hard timeout s, seconds kept back for it while earlier cases run).
BUDGETS = {"train": (200, 240, 60), "sam_blockwise": (30, 60, 25), "sam_reference": (30, 60, 25),
           "vs_torch": (120, 170, 80)}
CASES = tuple(BUDGETS)
# Every row the table holds, in order (the dry-run test checks each is there with a finite value).
ROWS = ("train.step_s", "train.tokens_per_s", "train.mfu", "train.mfu_causal", "train.memory_gib",
        "sam.blockwise_s", "sam.reference_s", "sam.time_ratio", "sam.blockwise_gib", "sam.reference_gib",
        "sam.memory_ratio", "vs_torch.forward_ratio", "vs_torch.prefill_ratio", "vs_torch.decode_ratio",
        "vs_torch.greedy_agreement")


def timed_loop(fn, count: int, seconds: float) -> list:
    """Wall times of fn() (which must block until its work is done): at least once, at most `count` times,
    and no new call once `seconds` have passed."""
    times, start = [], time.perf_counter()
    while len(times) < count and (not times or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def fit_rows(plan_bytes, limit: float, first: int, max_rows: int, fill: float, fixed_guess: float = 0.0,
             max_compiles: int = 3, time_left=lambda: True) -> int:
    """The most rows whose compiled plan stays under fill x limit. plan_bytes(rows) compiles and returns the
    plan's bytes (args + outputs - aliased + temp); memory grows linearly in the rows, so one compile at
    `first` with a guess of the fixed part (state, gradients) gives a first estimate, and a second gives the
    line itself. At most max_compiles compiles, fewer when time_left() says no."""
    target, seen = fill * limit, {}

    def plan(rows):
        seen[rows] = plan_bytes(rows)
        return seen[rows]

    rows = max(1, min(first, max_rows))
    while plan(rows) > target and rows > 1 and len(seen) < max_compiles:  # even `first` is too many
        rows //= 2
    if seen[rows] > target or rows >= max_rows:
        return rows
    fixed = min(fixed_guess, seen[rows])
    for _ in range(max_compiles - len(seen)):
        if not time_left():
            break
        pts = sorted(seen.items())
        if len(pts) >= 2:  # the line through the two largest points
            (b0, m0), (b1, m1) = pts[-2], pts[-1]
            per_row = max((m1 - m0) / (b1 - b0), 1.0)
            fixed = m1 - per_row * b1
        else:
            per_row = max((seen[rows] - fixed) / rows, 1.0)
        est = int(min(max_rows, max(1, (target - fixed) // per_row)))
        if est in seen:
            break
        plan(est)
    fitting = [b for b, m in seen.items() if m <= target]
    return max(fitting) if fitting else min(seen)


def device_info() -> dict:
    import jax
    d = jax.devices()[0]
    return {"device": f"{d.device_kind} ({d.platform}, {jax.device_count()} device(s))", "jax": jax.__version__}


def device_memory():
    import jax
    return jax.devices()[0].memory_stats() or {}


def plan_total(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def matmul_peak(dtype: str, n: int) -> float:
    """FLOP/s of an n x n x n matmul on this device (the MFU denominator when the peak table lacks it)."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    mm = jax.jit(lambda a: a @ a).lower(x).compile()
    jax.block_until_ready(mm(x))
    return 2 * n ** 3 / min(timed_loop(lambda: jax.block_until_ready(mm(x)), 10, 5.0))


# ---------------------------------------------------------------------------------------------
# the cases (each runs in a worker process)
# ---------------------------------------------------------------------------------------------
# config_base's optimizer (AdamW β 0.9/0.95, clip 1.0, no decay) at stage 2's learning rate, constant.
OPTIMIZER = dict(lr=3e-5, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0,
                 mu_dtype="float32", lr_mult={})


class OptimizerConfig(dict):
    """What make_optimizer reads of config.optimizer (attributes and .get), without ml_collections."""
    __getattr__ = dict.__getitem__


def train_batch(cfg, rows: int, seq_len: int, seed: int = 0) -> dict:
    """The data pipeline's batch contract with random tokens: one image (its token run after BOS) per row,
    one segment per row, loss on every text target."""
    import numpy as np
    rng = np.random.default_rng(seed)
    img, n_img, vocab = cfg.image_token_id, cfg.num_image_tokens, cfg.text.vocab_size
    ids = rng.integers(1, vocab, (rows, seq_len), dtype=np.int32)
    ids[ids == img] = img - 1
    ids[:, 1:1 + n_img] = img
    targets = np.roll(ids, -1, axis=1)
    loss_mask = ((targets != img) & (np.arange(seq_len) < seq_len - 1)).astype(np.float32)
    s = cfg.siglip.image_size
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
            "segment_ids": np.ones((rows, seq_len), np.int32), "task_ids": np.zeros((rows, seq_len), np.int32),
            "pixel_values": rng.standard_normal((rows, 1, 3, s, s)).astype(np.float32),
            "image_mask": np.ones((rows, 1), bool)}


def case_train(p: dict, budget: float) -> dict:
    import jax

    from dsvl_jax import config as C, sharding
    from dsvl_jax.models.vlm import DeepseekVL
    from dsvl_jax.state import abstract_state, init_params, make_state, param_shardings
    from dsvl_jax.train import flops, stages
    from dsvl_jax.train.optimizer import make_optimizer
    from dsvl_jax.train.step import make_train_step

    t_start = time.perf_counter()
    cfg = C.preset(p["model"]).replace(dtype="bfloat16", param_dtype="float32", remat_policy=p["remat"])
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    patterns = stages.patterns_for(p["stage"])
    _, abstract = param_shardings(cfg, mesh)
    mask = stages.trainable_mask(abstract, patterns)
    tx, lr_fn = make_optimizer(OptimizerConfig(OPTIMIZER), total_steps=1000, mask=mask)
    step = jax.jit(make_train_step(DeepseekVL(cfg), tx, mask, lr_fn, num_tasks=1, loss_chunk=p["loss_chunk"]),
                   donate_argnums=0)
    state_sds = abstract_state(cfg, mesh, tx, mask)
    compiled, compile_s = {}, []

    def batch_sds(rows):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
                for k, v in train_batch(cfg, rows, p["seq_len"]).items()}

    def plan_bytes(rows):
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled[rows] = step.lower(state_sds, batch_sds(rows)).compile()
        compile_s.append(time.perf_counter() - t0)
        return plan_total(compiled[rows])

    stats = device_memory()
    limit = stats.get("bytes_limit")
    if limit:  # fill the card; the fixed part ≈ fp32 params + Adam moments + gradients + the update
        trained, total = stages.count(abstract, mask)
        fixed = 4 * total + 4 * 4 * trained
        rows = fit_rows(plan_bytes, limit, p["first_rows"], p["max_rows"], p["fill"], fixed,
                        time_left=lambda: time.perf_counter() - t_start < 0.45 * budget)
    else:  # no memory figure from the device (CPU): the preset's rows
        rows = p["max_rows"]
        plan_bytes(rows)
    smaller = [r for r in compiled if r < rows] or ([rows // 2] if rows > 1 else [])
    tries, losses = [rows] + ([max(smaller)] if smaller else []), []
    for i, rows in enumerate(tries):  # the plan can miss runtime needs (cuBLAS workspace): one step down on OOM
        if rows not in compiled:
            plan_bytes(rows)
        exe = compiled[rows]
        try:
            with jax.set_mesh(mesh):
                state = make_state(init_params(cfg, mesh, seed=0), tx, mask, mesh, cfg)
                batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                         for k, v in train_batch(cfg, rows, p["seq_len"]).items()}

                def one():
                    nonlocal state
                    state, m = exe(state, batch)
                    losses.append(float(m["loss"]))  # blocks until the step is done

                timed_loop(one, 2, 1e9)  # warm-up: first runs, allocator growth
                left = budget - (time.perf_counter() - t_start)
                times = timed_loop(one, p["train_steps"], max(left - 5, 1.0))
            break
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or i == len(tries) - 1:
                raise
            state = batch = None
            losses.clear()
    step_s = statistics.median(times)
    count = flops.train_flops_per_step(cfg, batch_rows=rows, seq_len=p["seq_len"], images_per_step=rows,
                                       trainable_patterns=patterns, loss_chunk=p["loss_chunk"], num_tasks=1)
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
    peak_src = "the bf16 peak table"
    if peak is None:
        peak, peak_src = matmul_peak("bfloat16", 4096 if limit else 256), "the matmul rate measured here"
    stats, plan = device_memory(), plan_total(exe)
    if "peak_bytes_in_use" in stats:
        mem, mem_src = stats["peak_bytes_in_use"], f"process peak (memory_stats) of {limit / GIB:.1f} GiB usable"
    else:
        mem, mem_src = plan, "XLA's plan of the compiled step (no memory_stats here)"
    shape = (f"{cfg.text.num_hidden_layers}-layer {cfg.text.hidden_size}-wide LM, stage {p['stage']}, "
             f"{rows} rows x {p['seq_len']} tokens, 1 image/row, remat {p['remat']}, bf16 on fp32 params")
    return {
        "train.step_s": (step_s, "s", f"{shape}; median of {len(times)} steps after 2 warm-up, "
                                      f"compiles {', '.join(f'{c:.0f}' for c in compile_s)} s"),
        "train.tokens_per_s": (rows * p["seq_len"] / step_s, "tok/s", f"final loss {losses[-1]:.3f}"),
        "train.mfu": (flops.mfu(count["total"], step_s, 1, peak), "",
                      f"{count['total']:.4g} model FLOP/step (analytic) / {peak / 1e12:.3g} TFLOP/s from {peak_src}"),
        "train.mfu_causal": (flops.mfu(count["total_causal"], step_s, 1, peak), "",
                             "decoder attention FLOPs halved (causal)"),
        "train.memory_gib": (mem / GIB, "GiB", f"{mem_src}; plan {plan / GIB:.3g} GiB"),
    }


def case_sam(p: dict, impl: str, budget: float) -> dict:
    import jax
    import jax.numpy as jnp

    import relpos_attention as RA  # benchmarks/relpos_attention.py: its inputs and its fwd+bwd function

    t_start = time.perf_counter()
    args = RA.concrete_inputs(p["sam_heads"], jnp.bfloat16, jax.devices()[0], grid=tuple(p["sam_grid"]),
                              head_dim=p["sam_head_dim"])
    jax.block_until_ready(args)
    before = device_memory().get("bytes_in_use", 0)
    exe = jax.jit(RA.relpos(impl, grid=tuple(p["sam_grid"]))).lower(*args).compile()
    compiled_peak = device_memory().get("peak_bytes_in_use", 0)  # the compiler's scratch (autotuning) counts too
    run = lambda: jax.block_until_ready(exe(*args))  # noqa: E731
    timed_loop(run, 2, 1e9)
    times = timed_loop(run, p["sam_repeats"], max(budget - (time.perf_counter() - t_start), 1.0))
    ma = exe.memory_analysis()
    plan = ma.temp_size_in_bytes + ma.output_size_in_bytes
    run_peak = device_memory().get("peak_bytes_in_use", 0)
    if run_peak > compiled_peak:  # the counter only grows: this is the runs' own peak
        mem, src = run_peak - before, f"memory_stats peak above the inputs; XLA plan {plan / GIB:.3f} GiB"
    else:  # no counter (CPU), or compile scratch hid the runs' peak: XLA's plan (temp + outputs)
        mem, src = plan, "XLA's plan: temp + outputs" + (" (the compile's scratch peak hid the runs')"
                                                        if run_peak else "")
    H, W = p["sam_grid"]
    shape = f"1 x {p['sam_heads']} heads x {H * W} x {p['sam_head_dim']}, bf16, fwd+bwd"
    return {f"sam.{impl}_s": (statistics.median(times), "s", f"{shape}; median of {len(times)}"),
            f"sam.{impl}_gib": (mem / GIB, "GiB", src), f"sam.{impl}_plan_gib": (plan / GIB, "GiB", "XLA's plan")}


def case_vs_torch(p: dict, budget: float) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    import generate_vs_torch as G  # its prompt and its prefill / decode measurement
    from dsvl_jax import config as C
    from dsvl_jax.convert.state_dict import params_from_torch
    from dsvl_jax.models.vlm import DeepseekVL
    from dsvl_jax.runtime import VLM
    from tests.helpers import torch_ref as R
    from torch_peer import torch_model

    t_start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    cfg = C.preset(p["model"])
    model = torch_model(cfg)
    params = params_from_torch(model, cfg, dtype="bfloat16")
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = model.to(dev)
    for prm in model.parameters():  # bf16 weights, fp32 buffers (RoPE frequencies), as from_pretrained(dtype=bf16)
        prm.data = prm.data.to(torch.bfloat16)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    share = lambda: max((budget - (time.perf_counter() - t_start)) / 4, 1.0)  # noqa: E731

    # forward: fwd_rows rows of 1 image + text_tokens tokens
    fwd_len = cfg.num_image_tokens + p["text_tokens"]
    ids = R.prompt_ids(cfg, [1] * p["fwd_rows"], length=fwd_len, seed=0)
    pv, hv = R.image_batch(cfg, p["fwd_rows"], seed=0)
    tkw = {"input_ids": torch.from_numpy(ids).to(dev), "pixel_values": torch.from_numpy(pv).to(dev, torch.bfloat16)}
    if hv is not None:
        tkw["high_res_pixel_values"] = torch.from_numpy(hv).to(dev, torch.bfloat16)

    def torch_fwd():
        with torch.inference_mode():
            model(**tkw).logits
        sync()

    module = DeepseekVL(cfg)
    fwd = jax.jit(lambda prm, i, a, b: module.apply({"params": prm}, i, pixel_values=a, high_res_pixel_values=b))
    jargs = (params, jnp.asarray(ids, jnp.int32), jnp.asarray(pv), None if hv is None else jnp.asarray(hv))
    exe = fwd.lower(*jargs).compile()
    jax_fwd = lambda: jax.block_until_ready(exe(*jargs))  # noqa: E731
    for f in (torch_fwd, jax_fwd):
        f()
    t_torch = statistics.median(timed_loop(torch_fwd, p["repeats"], share()))
    t_jax = statistics.median(timed_loop(jax_fwd, p["repeats"], share()))
    del tkw, exe

    # greedy decode, batch 1, as generate_vs_torch measures it
    ids, pv, hv = G.prompt(cfg, p["text_tokens"])
    n = p["new_tokens"]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gkw = {"input_ids": torch.from_numpy(ids).to(dev), "attention_mask": torch.ones_like(torch.from_numpy(ids)).to(dev),
           "pixel_values": torch.from_numpy(pv).to(dev, torch.bfloat16), "do_sample": False}
    if hv is not None:
        gkw["high_res_pixel_values"] = torch.from_numpy(hv).to(dev, torch.bfloat16)

    def torch_gen(k):
        with torch.inference_mode():
            return model.generate(**gkw, max_new_tokens=k, min_new_tokens=k)[0, ids.shape[1]:].tolist()

    gen = VLM(cfg, params).generator
    jax_gen = lambda k: gen.generate(ids, max_new_tokens=k, pixel_values=pv,  # noqa: E731
                                     high_res_pixel_values=hv).tokens[0].tolist()
    jax_gen(1), jax_gen(n)  # compiles prefill, first token and the decode loop for both buckets
    side = {"torch": G._measure(torch_gen, n, p["repeats"] // 2 or 1),
            "jax": G._measure(jax_gen, n, p["repeats"] // 2 or 1, warm_up=False)}
    a, b = side["jax"]["tokens"], side["torch"]["tokens"]
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / n
    tj, tt = side["jax"]["decode_s_per_token"], side["torch"]["decode_s_per_token"]
    pj, pt = side["jax"]["prefill_s"], side["torch"]["prefill_s"]
    return {
        "vs_torch.forward_ratio": (t_jax / t_torch, "x", f"{p['fwd_rows']} rows x {fwd_len} tokens: dsvl_jax "
                                   f"{t_jax * 1e3:.1f} ms, torch {torch.__version__} on {dev_name} {t_torch * 1e3:.1f} ms"),
        "vs_torch.prefill_ratio": (pj / pt, "x", f"batch 1, {ids.shape[1]} prompt tokens: dsvl_jax {pj * 1e3:.1f} ms, "
                                   f"torch {pt * 1e3:.1f} ms"),
        "vs_torch.decode_ratio": (tj / tt, "x", f"s/token over {n} new tokens: dsvl_jax {1 / tj:.1f} tok/s, "
                                  f"torch {1 / tt:.1f} tok/s"),
        "vs_torch.greedy_agreement": (agree, "", f"of the {n} greedy tokens, the share equal before the first difference"),
    }


def worker(cases: list, p: dict, budgets: dict) -> dict:
    import traceback
    out = {"info": device_info(), "rows": {}, "seconds": {}, "errors": {}}
    for case in cases:
        t0 = time.perf_counter()
        try:
            if case == "train":
                rows = case_train(p, budgets[case])
            elif case.startswith("sam_"):
                rows = case_sam(p, case[4:], budgets[case])
            else:
                rows = case_vs_torch(p, budgets[case])
        except Exception as e:  # noqa: BLE001 - one case's failure leaves the others' rows
            traceback.print_exc()
            out["errors"][case] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        out["rows"].update({k: (float(v), unit, detail) for k, (v, unit, detail) in rows.items()})
        out["seconds"][case] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def run_worker(cases, mode, budgets, timeout, env_extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(
        {"cases": cases, "mode": mode, "budgets": budgets})]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **env_extra)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"errors": {c: f"timed out after {timeout:.0f} s" for c in cases}}
    if proc.returncode != 0 or '"errors": {}' not in proc.stdout:
        sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["(no stderr)"]
        return {"errors": {c: f"exit {proc.returncode}: {tail[0][:200]}" for c in cases}}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def derived(rows: dict) -> dict:
    """The SAM ratios, from the two SAM workers' rows; memory from one source for both (measured, else planned)."""
    measured = all("memory_stats" in rows.get(f"sam.{i}_gib", (0, "", ""))[2] for i in ("blockwise", "reference"))
    mem = "gib" if measured else "plan_gib"
    out = {}
    for key, num, den, what in (("sam.time_ratio", "sam.blockwise_s", "sam.reference_s", "time"),
                                ("sam.memory_ratio", f"sam.blockwise_{mem}", f"sam.reference_{mem}",
                                 "peak memory (memory_stats)" if measured else "memory (XLA's plans)")):
        if num in rows and den in rows and rows[den][0]:
            out[key] = (rows[num][0] / rows[den][0], "x", f"blockwise / reference {what}")
    return out


def print_table(rows: dict, errors: dict, header: list, cases: list) -> None:
    for line in header:
        print(f"# {line}")
    print(f"{'row':28s} {'value':>12s} {'unit':6s} detail")
    for key in ROWS:
        if key in rows:
            value, unit, detail = rows[key]
            text = f"{value:12.4g}" if value is not None else f"{'nan':>12s}"
        else:
            group, name = key.split(".")
            # the cases a row comes from: its group, or for sam.* the implementation it names (ratios: both)
            need = [c for c in CASES if c == group or (c.startswith(group) and (c[4:] in name or "ratio" in name))]
            why = "; ".join(f"{c}: {e}" for c, e in errors.items() if c in need)
            unit, detail = "", f"FAILED: {why}" if set(need) <= set(cases) else "not run (--cases)"
            text = f"{'nan':>12s}"
        print(f"{key:28s} {text} {unit:6s} {detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every case at tiny shapes on CPU")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--total-seconds", type=float, default=460.0, help="hard bound on the whole run")
    ap.add_argument("--json", default=None, help="also write the rows here as JSON")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(worker(spec["cases"], SHAPES[spec["mode"]], spec["budgets"])))
        return 0

    t0 = time.perf_counter()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows, errors, info, seconds = {}, {}, {}, {}
    results = []
    if args.dry_run:  # two workers side by side (compiles dominate, one core each), XLA at -O0: tiny shapes
        flags = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + flags).strip()}
        groups = [g for g in ([c for c in cases if c in ("train", "sam_blockwise")],
                              [c for c in cases if c in ("vs_torch", "sam_reference")]) if g]
        with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
            results = list(pool.map(lambda g: run_worker(g, "dry", {c: 10.0 for c in g}, args.total_seconds, env),
                                    groups))
    else:
        for i, case in enumerate(cases):
            budget, cap, _ = BUDGETS[case]
            reserve = sum(BUDGETS[c][2] for c in cases[i + 1:])
            timeout = min(cap, args.total_seconds - (time.perf_counter() - t0) - reserve)
            if timeout < 20:
                results.append({"errors": {case: "skipped: no time left"}})
                continue
            # train fills the card; the others leave memory to the allocator (and to torch)
            env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"} if case == "train" else \
                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
            results.append(run_worker([case], "full", {case: min(budget, timeout - 30)}, timeout, env))
    for res in results:
        errors.update(res["errors"])
        rows.update({k: tuple(v) for k, v in res.get("rows", {}).items()})
        seconds.update(res.get("seconds", {}))
        info = info or res.get("info", {})
    rows.update(derived(rows))
    bad = [k for k in ROWS if k not in rows or rows[k][0] is None or not math.isfinite(rows[k][0])]
    header = [f"device check ({'dry run, tiny shapes' if args.dry_run else 'full shapes'}): "
              f"{info.get('device', 'unknown device')}, jax {info.get('jax', '?')}, "
              f"{time.perf_counter() - t0:.0f} s"]
    header.append("seconds per case (in its worker): " + ", ".join(f"{c} {t:.0f}" for c, t in seconds.items()))
    if not args.dry_run and "(cpu" in info.get("device", ""):
        header.append("WARNING: full shapes ran on a CPU: JAX saw no accelerator (is JAX_PLATFORMS set?)")
    print_table(rows, errors, header, cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "errors": errors}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
