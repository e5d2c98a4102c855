"""Forward wall time, dsvl_jax vs transformers (PyTorch eager), same random weights and inputs, fp32, this CPU.

    .venv/bin/python benchmarks/forward_vs_torch.py [--cases small,1p3b,sam] [--repeats 3] [--dry-run]

Prints, per case, the median wall time of each side, the ratio dsvl_jax / PyTorch (targets: small ≤ 0.5,
1.3B ≤ 0.9, SAM-B@1024 ≤ 0.5), the JAX compile time apart, and a floor: the case's matmul/conv FLOPs (counted on its jaxpr, scanned layers included) at
this CPU's measured matmul rate over PyTorch's time: the ratio of an implementation that ran every FLOP
as fast as a large matmul runs here. Both run in this one process, one after the
other, so the comparison shares the machine's state; absolute times on shared machines mean little.
Peak memory: the 1.3B case holds two fp32 copies of the weights (~16 GB) for a moment.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.helpers: not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsvl_jax import config as C  # noqa: E402
from dsvl_jax.convert.state_dict import params_from_torch  # noqa: E402
from dsvl_jax.models.vlm import DeepseekVL  # noqa: E402
from dsvl_jax.train.flops import traced_matmul_flops  # noqa: E402
from tests.helpers import torch_ref as R  # noqa: E402
from torch_peer import median_time as _median_time, torch_model as _torch_model  # noqa: E402


def case_full_model(name, cfg, text_tokens, repeats):
    ids = R.prompt_ids(cfg, [1], length=cfg.num_image_tokens + text_tokens, seed=0)
    pv, hv = R.image_batch(cfg, 1, seed=0)
    model = _torch_model(cfg)
    tkw = dict(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pv))
    if hv is not None:
        tkw["high_res_pixel_values"] = torch.from_numpy(hv)
    with torch.inference_mode():
        model(**tkw)  # warm-up
        t_torch = _median_time(lambda: model(**tkw).logits, repeats)
    params = params_from_torch(model, cfg)
    del model, tkw
    gc.collect()
    module = DeepseekVL(cfg)
    fwd = jax.jit(lambda p, i, a, b: module.apply({"params": p}, i, pixel_values=a, high_res_pixel_values=b))
    args = (params, jnp.asarray(ids, jnp.int32), jnp.asarray(pv), None if hv is None else jnp.asarray(hv))
    t0 = time.perf_counter()
    compiled = fwd.lower(*args).compile()
    t_compile = time.perf_counter() - t0
    compiled(*args).block_until_ready()
    t_jax = _median_time(lambda: compiled(*args).block_until_ready(), repeats)
    return name, t_torch, t_jax, t_compile, traced_matmul_flops(fwd, *args)


def case_sam(repeats, base=None):
    """SAM-B at 1024 px (or `base`'s SAM, for a dry run) under a tiny LLM."""
    base = base or C.deepseek_vl_7b()
    cfg = base.replace(text=C.tiny().text, image_token_id=C.tiny().image_token_id)
    _, hv = R.image_batch(cfg, 1, seed=0)
    model = _torch_model(cfg)
    x = torch.from_numpy(hv)
    with torch.inference_mode():
        model.model.get_high_res_image_features(x)
        t_torch = _median_time(lambda: model.model.get_high_res_image_features(x), repeats)
    params = params_from_torch(model, cfg)
    del model
    gc.collect()
    module = DeepseekVL(cfg)
    fwd = jax.jit(lambda p, b: module.apply({"params": p}, b, method=lambda m, b: m.vision.encode_high(b)))
    args = (params, jnp.asarray(hv))
    t0 = time.perf_counter()
    compiled = fwd.lower(*args).compile()
    t_compile = time.perf_counter() - t0
    compiled(*args).block_until_ready()
    t_jax = _median_time(lambda: compiled(*args).block_until_ready(), repeats)
    return (f"SAM @{cfg.sam.image_size} alone (global attention: {cfg.sam_attention_impl})", t_torch, t_jax, t_compile,
            traced_matmul_flops(fwd, *args))


def matmul_rate(n: int = 4096, d: int = 768, f: int = 3072, repeats: int = 5) -> float:
    """This CPU's best fp32 matmul rate (FLOP/s) over XLA and PyTorch, on a ViT-B-sized MLP matmul: the
    yardstick for the floor below. Both libraries land within ~10 % of each other here."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((n, d), np.float32), rng.standard_normal((d, f), np.float32)
    mm = jax.jit(jnp.matmul).lower(x, w).compile()
    t_jax = _median_time(lambda: mm(x, w).block_until_ready(), repeats)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    t_torch = _median_time(lambda: tx @ tw, repeats)
    return 2 * n * d * f / min(t_jax, t_torch)


TARGETS = {"small": 0.5, "1p3b": 0.9, "sam": 0.5}


# Each case: (row name, config, text tokens, repeats factor); a dry run keeps the cases' code and swaps the
# shapes for the tiny presets (what `make test` runs: tests/test_benchmarks_dry_run.py).
def cases(dry_run: bool) -> dict:
    if dry_run:
        return {"small": ("small (tiny hybrid, 1 image + 8 text tokens)", C.tiny(), 8),
                "1p3b": ("1.3B layout at tiny shapes, 1 image + 8 text tokens", C.tiny(hybrid=False), 8),
                "sam": C.tiny()}
    return {"small": ("small (tiny hybrid, 1 image + 64 text tokens)", C.tiny(), 64),
            "1p3b": ("1.3B real shapes, 1 image + 64 text tokens", C.deepseek_vl_1p3b(), 64),
            "sam": None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small,1p3b,sam")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="every case at tiny shapes, once (what the tests run)")
    args = ap.parse_args(argv)
    table = cases(args.dry_run)
    unknown = [c for c in args.cases.split(",") if c not in table]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; expected some of {','.join(table)}")
    repeats = 1 if args.dry_run else args.repeats
    torch.set_num_threads(os.cpu_count())
    print(f"# jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPU threads, fp32")
    rate = matmul_rate(n=256, repeats=1) if args.dry_run else matmul_rate()
    print(f"# matmul rate of this CPU (best of XLA / PyTorch): {rate / 1e9:.0f} GFLOP/s. 'floor' = the case's matmul"
          " FLOPs at that rate over PyTorch's time: the ratio if every FLOP ran at matmul speed")
    print(f"{'case':52s} {'torch s':>9s} {'jax s':>9s} {'ratio':>7s} {'target':>7s} {'compile s':>10s} "
          f"{'GFLOP':>7s} {'floor':>6s}")
    for case in args.cases.split(","):
        if case == "sam":
            row = case_sam(repeats, table["sam"])
        else:
            name, cfg, text_tokens = table[case]
            row = case_full_model(name, cfg, text_tokens, repeats * (5 if case == "small" else 1))
        name, tt, tj, tc, flops = row
        print(f"{name:52s} {tt:9.3f} {tj:9.3f} {tj / tt:7.2f} {'≤' + str(TARGETS[case]):>7s} {tc:10.1f} "
              f"{flops / 1e9:7.3f} {flops / rate / tt:6.2f}", flush=True)
        gc.collect()

if __name__ == "__main__":
    main()
