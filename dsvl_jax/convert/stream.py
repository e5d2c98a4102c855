"""PyTorch layout → PyTorch layout (or → our param tree) one tensor at a time, through the key map.

A `TorchSource` reads a checkpoint folder through the key map forwards: asked for our param `p` (at
layer `i` of a stacked param) it reads the one PyTorch tensor that holds it. Exporting pulls from it
through the same map backwards (`export.plan_tensors`), so HF-port ↔ official never builds the full
param tree: the host holds one source tensor and the tensor being written. One table, two directions.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsvl_jax.convert import export, keymap
from dsvl_jax.convert.load import check_tensors, checkpoint_dtype, per_layer_shapes, read_config, source_config
from dsvl_jax.convert.safetensors_io import DTYPES, MAX_SHARD_BYTES, SafetensorsReader
from dsvl_jax.state import param_shapes


class TorchSource:
    """Our params, read lazily from a PyTorch-layout folder (HF port or official), checked up front.

    Opening reads config.json and the safetensors headers only, and fails (naming the file and key) on
    missing, unexpected, non-float or wrongly shaped tensors before any data is read."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.layout, cfg, _ = read_config(path)
        self.reader = SafetensorsReader(path)
        self.config = source_config(self.reader, cfg, self.layout)
        self.shapes = param_shapes(self.config)
        self._where = {}  # (our path, layer) → (mapping, part index)
        for m in check_tensors(self.reader, self.config, self.layout, self.shapes):
            for j, p in enumerate(m.ours):
                self._where[(p, m.layer)] = (m, j)
        uncovered = sorted({p for p in self.shapes} - {p for p, _ in self._where})
        if uncovered:  # a key-map bug, not bad input
            raise AssertionError(f"the key map leaves params unmapped: {uncovered[:4]}")
        self._cached = (None, None)

    # -- the three callbacks of export.plan_tensors --
    def shape_of(self, p: str):
        s = self.shapes.get(p)
        return None if s is None else tuple(s.shape)

    def dtype_of(self, p: str) -> np.dtype:
        m, _ = self._where.get((p, None)) or self._where[(p, 0)]
        return DTYPES[self.reader.info(m.torch_key)[1]]

    def array_of(self, p: str, layer) -> np.ndarray:
        m, j = self._where[(p, layer)]
        if self._cached[0] != m.torch_key:  # fused tensors (qkv) serve consecutive requests from one read
            self._cached = (None, None)
            t = self.reader.get(m.torch_key)
            self._cached = (m.torch_key, keymap.to_ours(m.kind, t, per_layer_shapes(m, self.shapes), m.in_ndim))
        return self._cached[1][j]

    def dtype_name(self) -> str:
        """The checkpoint's float dtype when it has one, else float32 (as load_pretrained decides)."""
        return checkpoint_dtype(self.reader)

    def params(self, dtype=None) -> dict:
        """Our nested param dict as numpy arrays (for an Orbax checkpoint), filled in key-map order, so each
        PyTorch tensor is read once (the parts of a fused one come consecutively); `dtype` casts on the way in."""
        target = None if dtype is None else np.dtype(jnp.dtype(dtype))
        out = {p: np.empty(s.shape, target or self.dtype_of(p)) for p, s in self.shapes.items()}
        for p, layer in self._where:
            arr = self.array_of(p, layer)
            if layer is None:
                out[p][...] = arr
            else:
                out[p][layer] = arr
        self._cached = (None, None)
        return traverse_util.unflatten_dict(out, sep="/")

    def close(self):
        self._cached = (None, None)
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def convert_torch(src: str, dst: str, layout: str, *, dtype=None, overwrite: bool = False,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """A PyTorch-layout folder → `layout` ("hf" | "official") at `dst`, streaming; side files travel along.

    dtype None keeps every tensor's dtype, so the conversion is a pure re-arrangement of bytes."""
    if layout not in keymap.LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {keymap.LAYOUTS}")
    with TorchSource(src) as source:
        plan, produce = export.plan_tensors(source.config, layout, source.shape_of, source.dtype_of,
                                            source.array_of, dtype)
        return export.write_folder(dst, source.config, layout, plan, produce, overwrite=overwrite,
                                   max_shard_bytes=max_shard_bytes, side_files_from=source.path)

