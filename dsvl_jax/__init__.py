"""dsvl_jax: DeepSeek-VL (1.3B and 7B) in JAX/Flax — training on TPU, tests on a CPU mesh, PyTorch interop.

    vlm = dsvl_jax.load_pretrained("path/to/deepseek-vl-7b-chat")   # → dsvl_jax.VLM
    dsvl_jax.save_pretrained(vlm, "out/", layout="official")

The public names below resolve on first use (PEP 562), so that `import dsvl_jax` (and so every
`import dsvl_jax.<module>`) stays cheap: no jax, flax, grain or torch until a name needs them.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "VLMConfig": "dsvl_jax.config",
    "load_pretrained": "dsvl_jax.convert.load",
    "save_pretrained": "dsvl_jax.convert.export",
    "VLM": "dsvl_jax.runtime",
    "Processor": "dsvl_jax.processing.processor",
    "InputError": "dsvl_jax.errors",
    "ConfigError": "dsvl_jax.errors",
    "CheckpointError": "dsvl_jax.errors",
}

__all__ = ["VLM", "VLMConfig", "Processor", "load_pretrained", "save_pretrained", "InputError", "ConfigError",
           "CheckpointError", "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dsvl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
