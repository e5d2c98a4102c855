"""Peak host memory of `dsvl-convert` on the 1.3B real-shape model, as a multiple of the checkpoint's size.

    python benchmarks/convert_memory.py [--directions hf:official official:hf hf:orbax orbax:hf] [--keep DIR]
                                        [--dry-run]

`--dry-run` runs the same steps on the tiny 1.3B-layout preset (kilobytes: the ratio means nothing there and
is not judged); `make test` runs it that way.

1. A subprocess initialises the deepseek_vl_1p3b preset with random weights in bfloat16
   (`jax.jit(model.init)`, params born in bf16 on the CPU device: no float32 copy) and writes them
   with our `save_pretrained` in the HF-port layout (~3.95 GB), one tensor at a time.
2. Each conversion runs in a fresh subprocess (`dsvl_jax.convert.cli.main`), which reports its own
   peak resident set size (`ru_maxrss` and VmHWM from /proc/self/status, which agree) and its RSS
   just after importing JAX/Flax/the converter, before touching the checkpoint.
3. Printed per direction: peak RSS, the checkpoint's size (the bf16 safetensors, 3.951 GB), their
   ratio (target ≤ 1.5x), the import-only baseline, and the wall time. Everything lives in one
   temporary folder (default under /tmp, ~4 GB per checkpoint made), removed at the end.

Measured on the shared 2-core, 24 GB dev machine (times inflated by other jobs):

    direction         peak RSS     ckpt   ratio   imports    time
    hf:official         1.12GB   3.95GB   0.28x    0.21GB     16s
    official:hf         1.12GB   3.95GB   0.28x    0.21GB     20s
    hf:orbax            4.65GB   3.95GB   1.18x    0.21GB     75s   (one pytree save: the params are held once)
    orbax:hf            1.98GB   3.95GB   0.50x    0.21GB    143s   (params restored one at a time)
    orbax:official      2.00GB   3.95GB   0.51x    0.21GB    166s

Before the safetensors reader switched from mmap to plain reads, hf:official peaked at 5.51 GB (1.40x):
mapped file pages count towards RSS until unmapped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


TARGET_RATIO = 1.5

_MAKE = r"""
import jax, flax.linen as nn
from dsvl_jax import config as C
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs
cfg = {preset}.replace(dtype="bfloat16", param_dtype="bfloat16")
ids, images = dummy_inputs(cfg)
init = jax.jit(lambda key: nn.meta.unbox(DeepseekVL(cfg).init(key, ids, **images)["params"]))
params = init(jax.random.key(0))
save_pretrained((cfg, params), {dst!r}, layout="hf")
"""

_CONVERT = r"""
import json, resource, time
def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
from dsvl_jax.convert import cli, export, orbax_io, stream  # everything the conversion imports
import jax, flax, orbax.checkpoint
base = rss_kb("VmRSS")
t = time.time()
rc = cli.main([{src!r}, {dst!r}, "--to", {to!r}])
out = dict(rc=rc, seconds=time.time() - t, baseline_kb=base, hwm_kb=rss_kb("VmHWM"),
           maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("RESULT " + json.dumps(out))
"""


def weights_bytes(folder: str) -> int:
    """Bytes of the safetensors files: the checkpoint's size, the denominator of every ratio (an Orbax copy
    of the same params is written uncompressed by the converter, so it is the same size plus metadata)."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def run(code: str, **fmt) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code.format(**fmt)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--directions", nargs="+", default=["hf:official"],
                    help="src:dst pairs among hf, official, orbax (each source must be made by an earlier one)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary folder goes")
    ap.add_argument("--keep", action="store_true", help="leave the checkpoints behind (prints the folder)")
    ap.add_argument("--dry-run", action="store_true", help="the tiny preset instead of the 1.3B (what the tests run)")
    args = ap.parse_args(argv)
    preset = "C.tiny(hybrid=False)" if args.dry_run else "C.deepseek_vl_1p3b()"
    total, _, free = shutil.disk_usage(args.tmp)
    if not args.dry_run and free < 9 * 10**9 * max(1, len(args.directions)):
        print(f"need ~{9 * max(1, len(args.directions))} GB free in {args.tmp}, have {free / 1e9:.1f} GB")
        return 1
    work = tempfile.mkdtemp(prefix="dsvl_convert_memory-", dir=args.tmp)
    rows, ok = [], True
    try:
        t = time.time()
        run(_MAKE, dst=os.path.join(work, "hf"), preset=preset)
        model_bytes = weights_bytes(os.path.join(work, "hf"))
        print(f"made the {'tiny' if args.dry_run else '1.3B'} bf16 HF-port checkpoint: {model_bytes / 1e9:.3f} GB in {time.time() - t:.0f} s")
        for pair in args.directions:
            src, to = pair.split(":")
            src_dir, dst_dir = os.path.join(work, src), os.path.join(work, to)
            if not os.path.isdir(src_dir):
                raise SystemExit(f"{pair}: no {src} checkpoint made yet (order the directions)")
            shutil.rmtree(dst_dir, ignore_errors=True)
            line = next(l for l in run(_CONVERT, src=src_dir, dst=dst_dir, to=to).splitlines()
                        if l.startswith("RESULT "))
            r = json.loads(line[len("RESULT "):])
            size = model_bytes
            peak = max(r["hwm_kb"], r["maxrss_kb"]) * 1024
            ratio = peak / size
            judged = not args.dry_run
            ok &= r["rc"] == 0 and (ratio <= TARGET_RATIO or not judged)
            rows.append((pair, peak, size, ratio, r["baseline_kb"] * 1024, r["seconds"], r["rc"], judged))
        print(f"{'direction':<16}{'peak RSS':>10}{'ckpt':>9}{'ratio':>8}{'imports':>10}{'time':>8}")
        for pair, peak, size, ratio, base, secs, rc, judged in rows:
            flag = "" if rc == 0 and (ratio <= TARGET_RATIO or not judged) else "  <-- FAIL"
            print(f"{pair:<16}{peak / 1e9:>8.2f}GB{size / 1e9:>7.2f}GB{ratio:>7.2f}x{base / 1e9:>8.2f}GB"
                  f"{secs:>7.0f}s{flag}")
        print(f"target: peak ≤ {TARGET_RATIO}x the checkpoint size")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
