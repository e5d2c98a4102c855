"""Input-pipeline throughput: examples/s per CPU core for the 7B and 1.3B preprocessing, 0 and 2 workers.

    python benchmarks/data_throughput.py [--examples 24] [--workers 0 2] [--models 7b 1.3b] [--dry-run]

`--dry-run` (what `make test` runs): the tiny presets, 2 examples, 0 and 1 workers, images drawn here.

Corpus: image-caption records built from the repository's example images (/work/shared/data/
deepseek_vl_examples: 7 real PNG/JPEG files, 300 px to 2000+ px, RGB and RGBA), cycled. Each example
goes the whole way: record parse -> decode -> RGB -> resize + pad to the square -> model views
(7B: 1024 px CLIP-normalised + 384 px antialiased resize, SigLIP-normalised; 1.3B: 384 px) ->
tokenise -> 576 image tokens -> one unpacked row of 4096 tokens -> batch of 1.

Two figures per setting:
- "maker": the per-example transform alone, in this process, single-threaded (pure per-core cost);
  CPU time, not wall time, because the machine may be shared;
- "pipeline": the Grain iterator end to end, after the first batches (which pay worker start-up):
  wall-clock examples/s, and examples per CPU-second summed over this process's threads and its
  worker processes (psutil) — the per-core figure, whatever the number of threads and workers.
Printed beside them: how many examples one training step consumes at the paper's batch sizes
(Table 4) and the core-seconds of preprocessing that implies per step.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

EXAMPLES_DIR = "/work/shared/data/deepseek_vl_examples"
SEQ_LEN = 4096
CPU_TICK = 0.01  # the process CPU clock counts in 10 ms ticks: a dry run's few examples may take less
TOKENS_PER_MM_EXAMPLE = 576 + 100  # one image plus a short caption / paragraph

# Paper Table 4: (stage, batch size, packed rows?, multimodal share of the batch)
PAPER_STEPS = {
    "7b": [("stage 1", 256, False, 1.0), ("stage 2", 2304, True, 0.3), ("stage 3", 256, False, 0.521)],
    "1.3b": [("stage 1", 256, False, 1.0), ("stage 2", 1024, True, 0.3), ("stage 3", 256, False, 0.521)],
}


def _model(name: str, image_token_id: int, dry_run: bool):
    from dsvl_jax import config as C

    if dry_run:
        cfg = C.tiny(hybrid=name == "7b")
    else:
        cfg = C.deepseek_vl_7b() if name == "7b" else C.deepseek_vl_1p3b()
    return cfg.replace(image_token_id=image_token_id)


def _drawn_images() -> list:
    """Two PNGs of odd sizes (one RGBA), for a dry run on a machine without the example images."""
    import io

    import numpy as np
    from PIL import Image

    rng, blobs = np.random.default_rng(0), []
    for (h, w), mode in (((300, 420), "RGB"), ((97, 61), "RGBA")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), np.uint8), mode).save(buf, "PNG")
        blobs.append(buf.getvalue())
    return blobs


def _corpus(directory: str, n: int, dry_run: bool):
    from dsvl_jax.data import records as R
    from dsvl_jax.data.mixture import SourceConfig

    if dry_run:
        blobs = _drawn_images()
    else:
        files = sorted(glob.glob(os.path.join(EXAMPLES_DIR, "*.png")) + glob.glob(os.path.join(EXAMPLES_DIR, "*.jp*g")))
        if not files:
            raise SystemExit(f"no example images in {EXAMPLES_DIR} (--dry-run draws its own)")
        blobs = [open(f, "rb").read() for f in files]
    recs = [R.Record(f"ex{i}", "bench", "caption", (R.image(0), R.text("a picture of a chart and a dog")),
                     (blobs[i % len(blobs)],)) for i in range(n)]
    R.write_records(os.path.join(directory, "cap"), recs)
    return SourceConfig("cap", os.path.join(directory, "cap-*")), recs


def bench_maker(cfg, tok, recs) -> float:
    from dsvl_jax.data import records as R
    from dsvl_jax.data.transforms import ExampleMaker

    maker = ExampleMaker(tok, cfg)
    items = [{"raw": R.serialize(r), "source": "bench", "code": i} for i, r in enumerate(recs)]
    maker(items[0])  # warm caches (resize taps)
    cpu = _cpu_seconds()
    for item in items:
        out = maker(item)
        assert "skip" not in out, out
    return len(items) / max(_cpu_seconds() - cpu, CPU_TICK)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and all its (worker) children so far."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_pipeline(cfg, tok, source, n: int, workers: int, seq_len: int = SEQ_LEN) -> tuple[float, float]:
    """(wall examples/s, examples per CPU-second)."""
    from dsvl_jax.data import loader as L

    # small buffers: work done ahead of the timed window would inflate the figures
    dc = L.DataConfig(sources=(source,), pack=False, max_images_per_row=1, num_epochs=None, read_threads=1,
                      read_buffer=2, worker_buffer=1)
    it = L.make_train_iterator(dc, cfg, tok, batch_size=1, seq_len=seq_len, seed=0, process_index=0,
                               process_count=1, worker_count=workers)
    for _ in range(1 + 2 * workers):  # start-up: every worker spawns, imports and opens the shards
        next(it)
    t, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(n):
        next(it)
    wall, cpu = time.perf_counter() - t, max(_cpu_seconds() - cpu, CPU_TICK)
    it.close()
    return n / wall, n / cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=24)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--models", nargs="+", default=["7b", "1.3b"], choices=["7b", "1.3b"])
    p.add_argument("--dry-run", action="store_true", help="tiny presets, 2 examples, 0 and 1 workers")
    args = p.parse_args(argv)
    seq_len = 128 if args.dry_run else SEQ_LEN
    if args.dry_run:
        args.examples, args.workers = 2, [0, 1]
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from dsvl_jax.data import synthetic

    cores = os.cpu_count() or 1
    print(f"CPU cores: {cores}; examples per measurement: {args.examples}; seq_len {seq_len}")
    with tempfile.TemporaryDirectory() as d:
        tok = synthetic.corpus_tokenizer(os.path.join(d, "tok"))
        source, recs = _corpus(d, args.examples, args.dry_run)
        for name in args.models:
            cfg = _model(name, tok.image_token_id, args.dry_run)
            views = f"{cfg.image_size} + {cfg.siglip.image_size}" if cfg.is_hybrid else f"{cfg.image_size}"
            print(f"\n== DeepSeek-VL {name} preprocessing ({views} px views) ==")
            per_core = bench_maker(cfg, tok, recs)
            print(f"  maker alone        : {per_core:7.2f} examples per CPU-second")
            for w in args.workers:
                rate, per_cpu_s = bench_pipeline(cfg, tok, source, args.examples, w, seq_len)
                print(f"  pipeline, {w} workers: {rate:7.2f} examples/s wall, {per_cpu_s:6.2f} per CPU-second")
            print("  one training step consumes (paper Table 4):")
            for stage, batch, packed, mm in PAPER_STEPS[name]:
                per_row = SEQ_LEN // TOKENS_PER_MM_EXAMPLE if packed else 1
                images = batch * mm * per_row
                print(f"    {stage}: batch {batch:5d}{' packed rows' if packed else ''}, ~{images:7.0f} image "
                      f"examples/step -> {images / per_core:8.1f} core-s of preprocessing per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
