"""Safetensors, one tensor at a time: a reader over single files or index-sharded folders, and a
streaming writer that never holds more than one tensor (the header is written first, from shapes).

No pickle anywhere: safetensors is a JSON header plus raw little-endian bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from dsvl_jax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_SHARD_BYTES = 5 * 10**9  # HF's default max shard size

# The one table of safetensors dtype codes; everything else is derived from it.
DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}
CODE_OF_NAME = {dt.name: code for code, dt in DTYPES.items()}  # "bfloat16" → "BF16" (numpy / torch names)
FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def _read_header(path: str) -> tuple:
    """(header dict, byte offset where tensor data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    _check_entries(path, header)
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: the header needs {8 + n + end} bytes, "
                              f"the file has {size}")
    return header, 8 + n


def _check_entries(path: str, header) -> None:
    """Every entry {"dtype": str, "shape": [n >= 0, ...], "data_offsets": [begin, end]}, before any is used."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    nat = lambda x: type(x) is int and x >= 0  # noqa: E731 (bool is not a size)
    for key, v in header.items():
        if key == "__metadata__":
            ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
        else:
            ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
                  and all(nat(d) for d in v["shape"]) and isinstance(v.get("data_offsets"), list)
                  and len(v["data_offsets"]) == 2 and all(nat(o) for o in v["data_offsets"])
                  and v["data_offsets"][0] <= v["data_offsets"][1])
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry {key!r}: {str(v)[:200]}")


class SafetensorsReader:
    """Random access to the tensors of `model.safetensors` or of an index + shards in `folder`."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_NAME)
        single = os.path.join(folder, SINGLE_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if os.path.basename(name) != name:
                    raise CheckpointError(f"{index}: shard name {name!r} points outside the checkpoint folder")
                if not os.path.exists(os.path.join(folder, name)):
                    raise CheckpointError(f"{index}: shard {name} is missing from {folder}")
        elif os.path.exists(single):
            files, weight_map = [SINGLE_NAME], None
        else:
            raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} (PyTorch .bin pickles are not read: "
                                  "convert them to safetensors first)")
        self._headers, self._data_start = {}, {}
        for name in files:
            self._headers[name], self._data_start[name] = _read_header(os.path.join(folder, name))
        self._where = {}
        for name, header in self._headers.items():
            for key in header:
                if key != "__metadata__":
                    self._where[key] = name
        if weight_map is not None:
            missing = sorted(k for k, v in weight_map.items() if self._where.get(k) != v)
            if missing:
                raise CheckpointError(f"{index}: {len(missing)} keys are not in the shard the index names, "
                                      f"e.g. {missing[:3]}")

    def keys(self) -> list:
        return sorted(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def info(self, key) -> tuple:
        """(shape, dtype code) without reading data."""
        entry = self._headers[self._where[key]][key]
        return tuple(entry["shape"]), entry["dtype"]

    def file_of(self, key) -> str:
        return os.path.join(self.folder, self._where[key])

    def metadata(self) -> dict:
        meta = {}
        for h in self._headers.values():
            meta.update(h.get("__metadata__") or {})
        return meta

    def get(self, key) -> np.ndarray:
        """One tensor, read with plain file reads into a fresh array. Not mmap: pages of a mapped file count
        towards this process's resident memory until it is unmapped, so reading a whole checkpoint through
        mmap would hold its full size in RSS (measured: 1.40x the checkpoint for a 1.3B conversion)."""
        name = self._where[key]
        path = os.path.join(self.folder, name)
        entry = self._headers[name][key]
        code, shape = entry["dtype"], tuple(entry["shape"])
        if code not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {code}, which this reader does not support")
        dt = DTYPES[code]
        begin, end = entry["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dt.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} spans {end - begin} bytes but {code}{list(shape)} "
                                  f"needs {count * dt.itemsize}")
        try:
            with open(path, "rb") as f:
                f.seek(self._data_start[name] + begin)
                arr = np.fromfile(f, dtype=dt.newbyteorder("<"), count=count)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None
        if arr.size != count:
            raise CheckpointError(f"{path}: tensor {key!r} is truncated")
        return arr.astype(dt, copy=False).reshape(shape)

    def close(self):
        pass  # no handles are kept open between reads


def dtype_code(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")
    return _CODES[dt]


def plan_shards(entries: list, max_shard_bytes: int = MAX_SHARD_BYTES) -> list:
    """entries: [(key, shape, dtype)] → list of shards, each a list of entries (order kept)."""
    shards, current, size = [], [], 0
    for key, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, tuple(shape), np.dtype(dtype)))
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_streaming(path: str, entries: list, produce, metadata: dict | None = None):
    """Write one safetensors file whose tensors come one at a time from `produce(key) -> np.ndarray`.

    `entries` = [(key, shape, dtype)] fixes the header up front, so only one tensor is ever in memory."""
    header, offset = {}, 0
    for key, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in entries:
            arr = np.ascontiguousarray(produce(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: tensor {key!r} came out as {arr.shape} {arr.dtype}, "
                                      f"planned {tuple(shape)} {np.dtype(dtype)}")
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            f.write(arr.reshape(-1).view(np.uint8).data)  # the array's own bytes: no second copy
            del arr


def write_checkpoint(folder: str, entries: list, produce, *, max_shard_bytes: int = MAX_SHARD_BYTES,
                     metadata: dict | None = None) -> list:
    """`model.safetensors`, or shards + `model.safetensors.index.json` past `max_shard_bytes`. Returns file names."""
    meta = {"format": "pt", **(metadata or {})}
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        write_streaming(os.path.join(folder, SINGLE_NAME), shards[0], produce, meta)
        return [SINGLE_NAME]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_streaming(os.path.join(folder, name), shard, produce, meta)
        names.append(name)
        for key, shape, dtype in shard:
            weight_map[key] = name
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names + [INDEX_NAME]


def iter_tensors(reader: SafetensorsReader) -> Iterator[tuple]:
    for key in reader.keys():
        yield key, reader.get(key)


def keys_of(entries: Iterable) -> list:
    return [e[0] for e in entries]
