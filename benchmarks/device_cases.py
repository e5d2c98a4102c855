"""The cases of `device_check.py`, run in its worker processes: the train step, SAM global attention, the
PyTorch peer. Each takes the mode's shapes and a time budget and returns {row key: (value, unit, detail)}.
Heavy imports (jax, torch, the project) happen inside the cases, so that importing this module is cheap."""
from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, REPO):  # torch_peer / generate_vs_torch / relpos_attention; dsvl_jax and tests.helpers
    if _p not in sys.path:
        sys.path.insert(0, _p)

GIB = 2 ** 30


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
# the cases
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
        mem = stats["peak_bytes_in_use"]
        mem_src = f"process peak (memory_stats) of {(limit or 0) / GIB:.1f} GiB usable"
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
                                   f"{t_jax * 1e3:.1f} ms, torch {torch.__version__} on {dev_name} "
                                   f"{t_torch * 1e3:.1f} ms"),
        "vs_torch.prefill_ratio": (pj / pt, "x", f"batch 1, {ids.shape[1]} prompt tokens: dsvl_jax {pj * 1e3:.1f} ms, "
                                   f"torch {pt * 1e3:.1f} ms"),
        "vs_torch.decode_ratio": (tj / tt, "x", f"s/token over {n} new tokens: dsvl_jax {1 / tj:.1f} tok/s, "
                                  f"torch {1 / tt:.1f} tok/s"),
        "vs_torch.greedy_agreement": (agree, "", f"of the {n} greedy tokens, the share equal before the first "
                                                 "difference"),
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
