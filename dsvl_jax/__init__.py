"""dsvl_jax: DeepSeek-VL (1.3B and 7B) in JAX/Flax — training on TPU, tests on a CPU mesh, PyTorch interop.

Public entry points are imported lazily so that `import dsvl_jax` stays cheap (no torch, no grain).
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "VLMConfig": "dsvl_jax.config",
    "load_pretrained": "dsvl_jax.convert.load",
    "save_pretrained": "dsvl_jax.convert.export",
    "VLM": "dsvl_jax.runtime",
    "Processor": "dsvl_jax.processing.processor",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsvl_jax' has no attribute {name!r}")
