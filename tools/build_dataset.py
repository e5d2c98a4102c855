"""Build validated record shards from public corpus formats: `python tools/build_dataset.py --help`.

The same tool as the `dsvl-data` entry point (dsvl_jax/data/build_cli.py).
"""
from __future__ import annotations

import sys

from dsvl_jax.data.build_cli import main

if __name__ == "__main__":
    sys.exit(main())
