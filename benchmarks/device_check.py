r"""The accelerator check: one script, one table, at most 8 minutes on one H100 or H200.

Rows (key, value, unit, detail), every one timed after warm-up with block_until_ready (torch: synchronize):
- train.*: the project's train step (`make_train_step` over `make_state` / `init_params`, `make_optimizer`'s
  AdamW, a one-device mesh) on the 1.3B shapes with random weights: bf16 compute on fp32 master weights,
  stage 2, 4,096 tokens and one image a row, as many rows as XLA's memory plan of the compiled step lets
  fill the card (`device_cases.fit_rows`). MFU = analytic model FLOPs (`dsvl_jax.train.flops`) / step time
  / the chip's bf16 peak (where the peak table has none, the matmul rate measured here).
- sam.*: SAM-B at 1024 px, one global-attention block forward + backward (1 image x 12 heads x 4,096 tokens
  x 64, bf16; `benchmarks/relpos_attention.py`'s inputs and step): the blockwise XLA path against the
  reference with the materialised N x N bias, time and peak device memory (memory_stats; XLA's plan where
  there are none). The Pallas kernel is TPU-only and not run.
- vs_torch.*: the 1.3B forward (8 rows of 1 image + 64 tokens) and batch-1 greedy decode (32 new tokens)
  against transformers on the same device, bf16, the same random weights (`params_from_torch`), as ratios
  dsvl_jax / torch (below 1: dsvl_jax is faster); prefill and decode measured as `generate_vs_torch.py`
  does. Agreement: the share of greedy tokens equal before the first difference (bf16 may part them).

Each case (`benchmarks/device_cases.py`) runs in its own subprocess (a clean peak-memory counter; JAX
preallocation is off beside torch) under a time budget and a hard timeout: the run ends within
--total-seconds (460) whatever happens. A case that fails prints nan and FAILED, and the script exits 1.

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
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:  # device_cases (the cases; it puts the repo on the path for dsvl_jax)
    sys.path.insert(0, HERE)

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
        import device_cases
        print(json.dumps(device_cases.worker(spec["cases"], SHAPES[spec["mode"]], spec["budgets"])))
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
