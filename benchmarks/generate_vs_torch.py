"""Decode and prefill speed: dsvl_jax `VLM.generate` (fp32, bf16, int8 weights) vs transformers `generate`
(fp32, and torch dynamic int8), same weights, CPU.

    python benchmarks/generate_vs_torch.py [--models small 1.3b] [--new-tokens 32] [--text-tokens 64]
    python benchmarks/generate_vs_torch.py --models 1.3b --new-tokens 64 --rounds 1 --repeats 1   # README row

Variants (each its own subprocess, one at a time): transformers fp32; transformers with
`torch.ao.quantization.quantize_dynamic` (int8 weights and dynamically quantized activations in every
nn.Linear); dsvl_jax with --weights fp32 / bf16 / int8 (`VLM.with_weights`: bf16 casts, int8 quantizes the
LLM linears and lm_head with per-output-channel scales after loading the fp32 checkpoint). Per variant:
batch-1 decode tokens/s, its bandwidth floor (the bytes of weights one token reads, over the measured
read bandwidth: the fastest any implementation of that dtype can decode here) and how far above it the
measured s/token is, the worker's peak host RSS (`ru_maxrss`: loading included), and batch-8 decode
throughput (one `generate` of --new-tokens at batch 8 after the batch-1 runs).

For each model: one random-weight checkpoint is written once (transformers' own init, fp32,
`save_pretrained`); then each side runs in its own subprocess, one after the other, so that only
one copy of the weights is ever in memory (the 1.3B is ~8 GB in fp32) and the two thread pools never
compete; `--rounds` alternates torch and dsvl_jax workers so that a change in machine load hits both.
The prompt is one image (random pixels) + `--text-tokens` random text tokens around it, batch 1;
EOS is off on both sides, so both decode exactly `--new-tokens` tokens (greedy).

Both sides are timed the same way, end to end through their public `generate` (input checks and host
transfers included), best of `--repeats` calls after a warm-up call (which compiles, for dsvl_jax):
- prefill s: one `generate(max_new_tokens=1)` call (images encoded, cache filled, first token);
- decode tok/s: 1 / ((t(N) - t(1)) / (N - 1)), N = --new-tokens;
- cpu ratio: the same decode difference in process CPU seconds (all threads), ours / torch — the
  work per token, less sensitive than wall time to other load on a shared machine;
- compile s (dsvl_jax): lowering + XLA compile of prefill, first token and decode loop (+ the single
  step of the streaming path), from the first calls.
dsvl_jax's own `Timings` (compile excluded, per phase) are in the JSON too. Targets: decode ≥ 3x,
prefill time ratio (ours / torch) ≤ 0.9.
Last, the bandwidth ceiling: batch-1 fp32 decoding reads every LM weight once a token, so the weights'
bytes over this machine's measured read bandwidth bound the s/token of any implementation; the largest
speedup over transformers that this machine allows is printed beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for tests.helpers (the PyTorch reference), which is not an installed package


def model_config(name: str):
    from dsvl_jax import config as C

    if name == "1.3b":
        return C.deepseek_vl_1p3b()
    if name == "1.3b-4l":
        # The 1.3B at its real widths (LLM, vocabulary, SigLIP) with 4 of its 24 decoder layers: each
        # decoded token still reads real-shaped matrices and the real lm_head, at a sixth of the time.
        full = C.deepseek_vl_1p3b()
        return full.replace(text=dataclasses.replace(full.text, num_hidden_layers=4))
    if name == "tiny":  # --dry-run: the tests' 1.3B-layout preset
        return C.tiny(hybrid=False)
    if name == "small":
        # The 1.3B layout at 1/4 width and 4 layers, real vocabulary and real 384 px / 576-token images:
        # a regime where per-token overhead, not weight traffic, decides the decode speed.
        return C.VLMConfig(
            text=C.TextConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=8, head_dim=64),
            siglip=C.SiglipConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=4),
            adapter="mlp_gelu")
    raise ValueError(f"unknown model {name!r}: expected 'small', '1.3b' or '1.3b-4l'")


def prompt(cfg, text_tokens: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.setdiff1d(np.arange(1, min(cfg.text.vocab_size, 100000)), [cfg.image_token_id])
    text = rng.choice(vocab, size=text_tokens)
    half = text_tokens // 2
    ids = np.concatenate([text[:half], np.full(cfg.num_image_tokens, cfg.image_token_id), text[half:]])
    pv = rng.standard_normal((1, 3, cfg.siglip.image_size, cfg.siglip.image_size)).astype(np.float32)
    hv = None
    if cfg.is_hybrid:
        s = cfg.sam.image_size
        hv = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    return ids[None].astype(np.int64), pv, hv


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def make_checkpoint(name: str, path: str) -> dict:
    import torch
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    from tests.helpers.torch_ref import hf_config

    cfg = model_config(name)
    torch.manual_seed(0)
    klass = DeepseekVLHybridForConditionalGeneration if cfg.is_hybrid else DeepseekVLForConditionalGeneration
    t0 = time.perf_counter()
    model = klass(hf_config(cfg)).eval().float()
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "seconds": time.perf_counter() - t0}


def _measure(generate, new_tokens: int, repeats: int, warm_up: bool = True) -> dict:
    """Prefill = one call with max_new_tokens=1; decode = (t(N) - t(1)) / (N - 1); wall and process CPU
    seconds (all threads), best of `repeats` after a warm-up call."""
    def timed(n):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = generate(n)
        return time.perf_counter() - t0, time.process_time() - c0, tokens

    if warm_up:
        timed(2)
    one = [timed(1) for _ in range(repeats)]
    full = [timed(new_tokens) for _ in range(repeats)]
    assert all(len(r[2]) == new_tokens for r in full), "generation stopped early"
    wall1, cpu1 = min(r[0] for r in one), min(r[1] for r in one)
    walln, cpun = min(r[0] for r in full), min(r[1] for r in full)
    return {"prefill_s": wall1, "prefill_cpu_s": cpu1,
            "decode_s_per_token": (walln - wall1) / (new_tokens - 1),
            "decode_cpu_s_per_token": (cpun - cpu1) / (new_tokens - 1),
            "tokens": [int(t) for t in full[0][2]], "load_avg": os.getloadavg()[0]}


def _peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _batched(ids, pv, hv, batch: int):
    import numpy as np
    rep = lambda a: None if a is None else np.repeat(a, batch, axis=0)  # noqa: E731
    return rep(ids), rep(pv), rep(hv)


def run_torch(name: str, path: str, new_tokens: int, text_tokens: int, repeats: int, weights: str = "fp32",
              batch: int = 8) -> dict:
    import torch
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    cfg = model_config(name)
    klass = DeepseekVLHybridForConditionalGeneration if cfg.is_hybrid else DeepseekVLForConditionalGeneration
    model = klass.from_pretrained(path, dtype=torch.float32).eval()
    if weights == "int8":  # torch's own CPU int8 path: every nn.Linear, int8 weights, dynamic activation scales
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def make_generate(ids, pv, hv):
        kw = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones_like(torch.from_numpy(ids)),
              "pixel_values": torch.from_numpy(pv), "do_sample": False}
        if hv is not None:
            kw["high_res_pixel_values"] = torch.from_numpy(hv)

        def generate(n):
            with torch.inference_mode():
                return model.generate(**kw, max_new_tokens=n, min_new_tokens=n)[0, ids.shape[1]:].tolist()
        return generate

    ids, pv, hv = prompt(cfg, text_tokens)
    out = _measure(make_generate(ids, pv, hv), new_tokens, repeats)
    out["peak_rss_gb"] = _peak_rss_gb()
    if batch > 1:
        gen_b = make_generate(*_batched(ids, pv, hv, batch))
        t1 = _timed(lambda: gen_b(1))
        tn = _timed(lambda: gen_b(new_tokens))
        out["batch_decode_tokens_per_s"] = batch * (new_tokens - 1) / (tn - t1)
    return {**out, "threads": torch.get_num_threads(), "weights": weights, "batch": batch}


def run_jax(name: str, path: str, new_tokens: int, text_tokens: int, repeats: int, devices: int = 1,
            weights: str = "fp32", batch: int = 8) -> dict:
    import jax

    from dsvl_jax import sharding
    from dsvl_jax.convert.load import load_pretrained
    from dsvl_jax.models.quant import weight_bytes

    cfg = model_config(name)
    assert jax.device_count() == devices, (jax.device_count(), devices)
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=devices) if devices > 1 else None
    # bf16 is cast while loading (no fp32 copy); int8 quantizes the loaded fp32 model, whose copy then goes.
    vlm = load_pretrained(path, mesh=mesh, dtype="bfloat16" if weights == "bf16" else None).with_weights(weights)
    ids, pv, hv = prompt(cfg, text_tokens)
    gen = vlm.generator
    kw = dict(pixel_values=pv, high_res_pixel_values=hv)
    first = gen.generate(ids, max_new_tokens=new_tokens, **kw)  # compiles prefill + first token + decode loop
    last = {}

    def generate(n):
        last[n] = gen.generate(ids, max_new_tokens=n, **kw)
        return last[n].tokens[0]

    out = _measure(generate, new_tokens, repeats, warm_up=False)
    loop = last[new_tokens].timings
    stepped = first  # the streaming path is timed for fp32 only (the 1.3B bf16/int8 runs are long enough)
    if weights == "fp32":
        stepped = gen.generate(ids, loop="python", max_new_tokens=new_tokens, **kw)  # compiles the single step
    out["peak_rss_gb"] = _peak_rss_gb()
    lm = {k: v for k, v in vlm.params["language_model"].items() if k != "embed_tokens"}
    out["decode_weight_bytes"] = weight_bytes(lm)  # what one token reads: layers, final norm, lm_head
    if batch > 1:
        ids_b, pv_b, hv_b = _batched(ids, pv, hv, batch)
        gen.generate(ids_b, max_new_tokens=2, pixel_values=pv_b, high_res_pixel_values=hv_b)  # compiles
        timed = gen.generate(ids_b, max_new_tokens=new_tokens, pixel_values=pv_b, high_res_pixel_values=hv_b)
        out["batch_decode_tokens_per_s"] = timed.timings.decode_tokens_per_s  # compile excluded
    out.update(weights=weights, batch=batch)
    return {**out, "compile_s": first.timings.compile_s,
            "compile_s_step": 0.0 if stepped is first else stepped.timings.compile_s,
            "engine_prefill_s": loop.prefill_s, "engine_decode_tokens_per_s": loop.decode_tokens_per_s,
            "engine_decode_tokens_per_s_python_loop": stepped.timings.decode_tokens_per_s,
            "same_tokens_python_loop": stepped.tokens.tolist() == first.tokens.tolist(),
            "prompt_tokens": int(ids.shape[1]), "devices": devices}


WORKERS = {"checkpoint": make_checkpoint, "torch": run_torch, "jax": run_jax}


def _subprocess(worker: str, *args, devices: int = 1) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", worker, *map(str, args)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small", "1.3b"], choices=["small", "1.3b", "1.3b-4l"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating torch/jax worker rounds")
    ap.add_argument("--jax-devices", type=int, nargs="+", default=[1],
                    help="dsvl_jax runs: 1 = one CPU device; n > 1 = n host devices as a tensor-parallel mesh "
                         "(XLA runs a batch-1 matrix-vector product on one thread per device)")
    ap.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"],
                    help="dsvl_jax weight variants (transformers runs fp32 and dynamic int8)")
    ap.add_argument("--batch", type=int, default=8, help="batch of the throughput run (1: none)")
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true",
                    help="every side on the tiny preset: 4 new tokens, one round, batch 2 (what the tests run)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.models, args.new_tokens, args.text_tokens, args.repeats, args.rounds, args.batch = \
            ["tiny"], 4, 8, 1, 1, 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the parent's weight count must not look for a TPU
    if args._worker:
        worker, name, path, *rest = args._worker
        print(json.dumps(WORKERS[worker](name, path, *(int(x) if x.isdigit() else x for x in rest))))
        return 0

    results = {}
    sides = {"torch": ("torch", "fp32", 1), "torch_int8": ("torch", "int8", 1)}
    for d in args.jax_devices:
        for w in args.weights:
            sides[f"jax{d}_{w}"] = ("jax", w, d)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in args.models:
            path = os.path.join(tmp, name)
            made = _subprocess("checkpoint", name, path)
            runs = {side: [] for side in sides}
            for _ in range(args.rounds):  # alternate, so that a change in machine load hits every side
                for side, (kind, w, d) in sides.items():
                    common = (name, path, args.new_tokens, args.text_tokens, args.repeats)
                    if kind == "torch":
                        runs[side].append(_subprocess("torch", *common, w, args.batch))
                    else:
                        runs[side].append(_subprocess("jax", *common, d, w, args.batch, devices=d))
            shutil.rmtree(path, ignore_errors=True)
            best = {side: _best(r) for side, r in runs.items()}
            fp32_tokens = {tuple(r["tokens"]) for side, rs in runs.items() for r in rs if sides[side][1] == "fp32"}
            results[name] = {"params": made["params"], "runs": runs, "best": best,
                             "same_greedy_tokens": len(fp32_tokens) == 1}
            ref = best["torch"]["tokens"]
            for side, b in best.items():
                b["decode_speedup"] = best["torch"]["decode_s_per_token"] / b["decode_s_per_token"]
                b["prefill_time_ratio"] = b["prefill_s"] / best["torch"]["prefill_s"]
                b["decode_cpu_ratio"] = b["decode_cpu_s_per_token"] / best["torch"]["decode_cpu_s_per_token"]
                b["tokens_equal_torch_fp32"] = sum(x == y for x, y in zip(b["tokens"], ref)) / len(ref)
    bw = read_bandwidth()
    for name, r in results.items():
        fp32_bytes = decode_weight_bytes(name)
        for side, b in r["best"].items():
            w = sides[side][1]
            nbytes = b.get("decode_weight_bytes") or (fp32_bytes if w == "fp32" else None)
            if side == "torch_int8":  # quantize_dynamic packs every Linear as int8 (+ per-tensor scale)
                nbytes = fp32_bytes // 4
            b["floor_s_per_token"] = nbytes / bw
            b["above_floor"] = b["decode_s_per_token"] / b["floor_s_per_token"]
    if args.json:
        print(json.dumps({"read_bandwidth": bw, "results": results}, indent=1))
        return 0
    if args.dry_run:
        print("dry run: the tiny preset, 4 tokens; the code path only, the timings mean nothing")
    print(f"prompt: 1 image + {args.text_tokens} text tokens, batch 1, {args.new_tokens} new tokens, greedy, "
          f"{os.cpu_count()} CPU cores; best of {args.rounds} alternating rounds x {args.repeats} calls; "
          f"memory read bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'model':6} {'params':>6} {'side':22} {'prefill s':>9} {'ratio':>6} {'decode tok/s':>12} {'speedup':>7} "
          f"{'cpu ratio':>9} {'floor tok/s':>11} {'x floor':>7} {'peak GB':>7} {f'b{args.batch} tok/s':>9} "
          f"{'=fp32':>5} {'compile s':>9} {'load':>5}")
    for name, r in results.items():
        for side, b in r["best"].items():
            kind, w, d = sides[side]
            label = f"transformers {'fp32' if w == 'fp32' else 'dyn-int8'}" if kind == "torch" else f"dsvl_jax {w} x{d}dev"
            print(f"{name:6} {r['params'] / 1e9:5.2f}B {label:22} {b['prefill_s']:9.2f} {b['prefill_time_ratio']:6.2f} "
                  f"{1 / b['decode_s_per_token']:12.2f} {b['decode_speedup']:6.2f}x {b['decode_cpu_ratio']:9.2f} "
                  f"{1 / b['floor_s_per_token']:11.2f} {b['above_floor']:7.2f} {b['peak_rss_gb']:7.2f} "
                  f"{b.get('batch_decode_tokens_per_s', float('nan')):9.2f} {b['tokens_equal_torch_fp32']:5.2f} "
                  f"{b.get('compile_s', float('nan')):9.1f} {b['load_avg']:5.1f}")
        print(f"{name:6} same greedy tokens on every fp32 side: {r['same_greedy_tokens']}; '=fp32': share of the "
              "greedy tokens equal to transformers fp32 (free-running: a first flip changes every later one)")
    return 0


def decode_weight_bytes(name: str) -> int:
    """Bytes of weights one decoded token must read (fp32): the decoder layers, final norm and LM head;
    the input embedding is gathered (one row), the vision towers are not run."""
    import math

    import flax.linen as nn
    from flax import traverse_util

    from dsvl_jax.state import abstract_params
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(model_config(name))), sep="/")
    return 4 * sum(math.prod(v.shape) for k, v in flat.items()
                   if k.startswith("language_model/") and "embed_tokens" not in k)


def read_bandwidth(gib: int = 2, repeats: int = 5) -> float:
    """This machine's memory read rate (bytes/s): a multi-threaded sum over a buffer far larger than cache."""
    import torch
    x = torch.ones(gib * 2**28, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _best(runs: list) -> dict:
    """Per figure, the best over rounds (the least disturbed by other load)."""
    out = dict(min(runs, key=lambda r: r["decode_s_per_token"]))
    out["prefill_s"] = min(r["prefill_s"] for r in runs)
    if "compile_s" in out:
        out["compile_s"] = min(r["compile_s"] + r["compile_s_step"] for r in runs)
    out["load_avg"] = max(r["load_avg"] for r in runs)
    return out


if __name__ == "__main__":
    sys.exit(main())
