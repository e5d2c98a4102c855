"""An in-memory PyTorch state dict as a checkpoint reader: convert a live torch model without a disk
round trip (benchmarks, notebooks). Tensors are viewed, not copied, until the key map transforms them."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from dsvl_jax.convert.load import load_params
from dsvl_jax.convert.safetensors_io import CODE_OF_NAME


class StateDictReader:
    def __init__(self, state_dict, name: str = "<state_dict>"):
        self._sd = state_dict
        self.folder = name

    def keys(self):
        return sorted(self._sd)

    def __contains__(self, key):
        return key in self._sd

    def info(self, key):
        t = self._sd[key]
        dt = str(t.dtype).replace("torch.", "")
        return tuple(t.shape), CODE_OF_NAME.get(dt, dt.upper())

    def file_of(self, key):
        return self.folder

    def get(self, key) -> np.ndarray:
        t = self._sd[key].detach()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bf16: reinterpret the bits
            return t.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def close(self):
        pass


def params_from_torch(model, cfg, layout: str = "hf", *, dtype=None, mesh=None):
    """A transformers DeepSeek-VL model (or its state_dict) → our params for `cfg`."""
    sd = model.state_dict() if hasattr(model, "state_dict") else model
    return load_params(StateDictReader(sd), cfg, layout, dtype=dtype, mesh=mesh)
