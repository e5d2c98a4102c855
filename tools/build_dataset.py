"""Build validated record shards from public corpus formats: `python tools/build_dataset.py --help`.

The same tool as the `dsvl-data` entry point (dsvl_jax/data/build_cli.py).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsvl_jax.data.build_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
