"""Ahead-of-time compile of a training config's train step for a TPU slice, on a CPU-only host:
`python tools/aot_compile.py --help` (the library, with the measured figures: dsvl_jax/train/aot.py).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; never try to run on one (set before jax loads)
# Compiling needs no exclusive TPU: without this, a second process loading libtpu (another compile, the
# tpu_aot tests) fails on libtpu's lockfile for as long as a 15-minute 7B compile runs.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from dsvl_jax.train.aot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
