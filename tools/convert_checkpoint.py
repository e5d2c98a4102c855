"""Convert DeepSeek-VL checkpoints (Orbax ↔ HF port ↔ official layout): `python tools/convert_checkpoint.py --help`.

The same tool as the `dsvl-convert` entry point (dsvl_jax/convert/cli.py).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsvl_jax.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
