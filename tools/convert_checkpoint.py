"""Convert DeepSeek-VL checkpoints (Orbax ↔ HF port ↔ official layout): `python tools/convert_checkpoint.py --help`.

The same tool as the `dsvl-convert` entry point (dsvl_jax/convert/cli.py).
"""
from __future__ import annotations

import sys

from dsvl_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
