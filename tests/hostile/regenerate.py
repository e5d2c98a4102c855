"""Writes the committed files of the hostile-input corpus (tests/hostile/files/); `manifest.json` says
what each one is and what must happen to it. Deterministic: running it again gives the same bytes.

    python tests/hostile/regenerate.py

Inputs that would be large (decompression bombs, deeply nested JSON) are not files: the manifest
describes them and tests/test_hostile_corpus.py builds them at test time.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "files")
MAGIC = b"DSVLREC1"  # dsvl_jax.data.records.MAGIC (spelled out: the corpus must not follow code changes)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(idat))
            + png_chunk(b"IEND", b""))


def encoded(fmt: str, size=(12, 10), mode="RGB", seed=0, **kw) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def record(header, images: tuple[bytes, ...] = (), *, raw_header: bytes | None = None) -> bytes:
    blob = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + b"".join(images)


def caption(text="a small photo", *, task="caption", id_="r", images=None, segments=None, image_bytes=None):
    images = (encoded("PNG"),) if images is None else images
    segments = [{"image": 0}, {"text": text, "role": None}] if segments is None else segments
    header = {"id": id_, "source": "hostile", "task": task, "segments": segments,
              "image_bytes": [len(b) for b in images] if image_bytes is None else image_bytes}
    return record(header, images)


def files() -> dict[str, bytes]:
    png, jpeg = encoded("PNG"), encoded("JPEG", quality=90)
    out = {
        # images
        "images/good.png": png,
        "images/truncated.png": png[: len(png) // 2],
        "images/truncated.jpg": jpeg[: len(jpeg) * 2 // 3],
        "images/empty.png": b"",
        "images/text.png": b"this is plain text pretending to be an image\n" * 4,
        "images/bad_crc.png": png[:40] + bytes([png[40] ^ 0xFF]) + png[41:],
        "images/zero_width.png": png_header_only(0, 16),
        "images/short_idat.png": png_header_only(64, 64, b"\x00" * 10),
        "images/svg_xxe.svg": (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                               b'<svg xmlns="http://www.w3.org/2000/svg">&x;</svg>'),
        "images/bmp_truncated.bmp": encoded("BMP")[:80],
        "images/gif_truncated.gif": encoded("GIF", mode="L")[:30],
        "images/tiff_bad_ifd.tif": b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + b"\x00" * 8,
        "images/trailing_garbage.png": png + b"\x00GARBAGE" * 16,  # decodes: PIL stops at IEND
        "images/cmyk.jpg": encoded("JPEG", mode="CMYK"),  # unusual but valid: converted to RGB
        # records (the loader's binary format)
        "records/bad_magic.rec": b"NOTAREC1" + b"\x00" * 32,
        "records/truncated_length.rec": MAGIC + b"\x01\x00",
        "records/header_overflow.rec": MAGIC + struct.pack("<I", 0xFFFFFFFF) + b"{}",
        "records/header_not_json.rec": record(None, raw_header=b"{'id': 'python repr, not JSON'}"),
        "records/header_is_list.rec": record(["id", "source", "task"]),
        "records/header_latin1.rec": record(None, raw_header='{"id": "caf\xe9"}'.encode("latin-1")),
        "records/negative_image_size.rec": caption(image_bytes=[-5]),
        "records/extra_image_bytes.rec": caption()[:-1] + b"\x00\x00",
        "records/image_out_of_order.rec": caption(images=(png, png), segments=[
            {"image": 1}, {"text": "two", "role": None}, {"image": 0}]),
        "records/unknown_role.rec": caption(segments=[{"image": 0}, {"text": "x", "role": "root"}]),
        "records/mixed_roles.rec": caption(images=(), segments=[{"text": "q", "role": "user"},
                                                                {"text": "doc", "role": None}]),
        "records/empty_id.rec": caption(id_=""),
        "records/image_is_a_path.rec": caption(images=(b"../../../../etc/passwd",)),
        "records/unknown_task.rec": caption(task="exfiltrate"),
        "records/literal_image_tag.rec": caption(text="look: <image_placeholder> here"),
        "records/no_assistant_turn.rec": caption(images=(), segments=[{"text": "hello?", "role": "user"}]),
        "records/system_after_user.rec": caption(images=(), segments=[
            {"text": "hi", "role": "user"}, {"text": "obey", "role": "system"}, {"text": "ok", "role": "assistant"}]),
        "records/blank_text.rec": caption(text="  \n\t "),
        "records/bool_image_index.rec": caption(segments=[{"image": True}, {"text": "x", "role": None}]),
        "records/good.rec": caption(),
        # checkpoints (safetensors: u64 header length | JSON header | data)
        "checkpoints/seven_bytes.safetensors": b"\x00" * 7,
        "checkpoints/header_too_long.safetensors": struct.pack("<Q", 1 << 40) + b"{}",
        "checkpoints/header_not_json.safetensors": struct.pack("<Q", 6) + b"{nope}",
        "checkpoints/header_is_list.safetensors": struct.pack("<Q", 2) + b"[]",
        "checkpoints/offsets_past_end.safetensors": _safetensors({"w": ("F32", [4], [0, 16])}, b"\x00" * 8),
        "checkpoints/offsets_wrong_size.safetensors": _safetensors({"w": ("F32", [4], [0, 12])}, b"\x00" * 12),
        "checkpoints/unknown_dtype.safetensors": _safetensors({"w": ("F8_E4M3", [4], [0, 4])}, b"\x00" * 4),
        "checkpoints/no_offsets.safetensors": _with_length(b'{"w":{"dtype":"F32","shape":[1]}}'),
        "checkpoints/negative_shape.safetensors": _safetensors({"w": ("F32", [-1, 4], [0, 0])}, b""),
        "checkpoints/index_outside.json": json.dumps({"weight_map": {"w": "../../../etc/passwd"}}).encode(),
        "checkpoints/index_garbage.json": b"{\"weight_map\": ",
        "checkpoints/config_garbage.json": b"\xff\xfe not json",
        "checkpoints/config_llava.json": json.dumps({"model_type": "llava"}).encode(),
        # tokenizers
        "tokenizers/garbage.json": b'{"version": "1.0", "model": 42}',
        "tokenizers/garbage.model": b"\x0a\x05hello" + b"\xff" * 20,
    }
    return out


def _with_length(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _safetensors(entries: dict, data: bytes) -> bytes:
    header = {k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()}
    return _with_length(json.dumps(header, separators=(",", ":")).encode(), data)


def main():
    for rel, data in files().items():
        path = os.path.join(OUT, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    print(f"{len(files())} files under {OUT}")


if __name__ == "__main__":
    main()
