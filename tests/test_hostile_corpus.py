"""The hostile-input corpus (tests/hostile/manifest.json): every entry meets its expected outcome — a
clear error of the documented type naming the input, a counted skip with its reason, or acceptance —
and never a crash, a hang or code run from the input. Then the records and images of the corpus,
planted together in one shard, go through the training loader: every bad one is skipped and counted
under its reason, every good one comes out.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.convert import config_io
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.convert.safetensors_io import SafetensorsReader
from dsvl_jax.data import build_cli
from dsvl_jax.data import loader as L
from dsvl_jax.data import records as R
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.data.transforms import ExampleMaker, image_error_reason
from dsvl_jax.processing import image as image_lib
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.train import trainer, validate
from tests.helpers.train_fixtures import tiny_config

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile")
FILES = os.path.join(HERE, "files")
with open(os.path.join(HERE, "manifest.json")) as _f:
    ENTRIES = json.load(_f)["entries"]
CFG = C.tiny()


# ---------------------------------------------------------------------------------------------
# inputs built at test time (too large, or too odd, to commit)
# ---------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header for a huge image with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) \
        + _png_chunk(b"IEND", b"")


def png_zeros(width: int, height: int) -> bytes:
    """A complete, valid PNG of zeros: a few hundred KB that would inflate to width·height·3 bytes."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame claim width×height, with one pixel of data."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b";"


class _Payload:
    """Unpickling this would create `marker` (the proof that a loader ran code from a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def generate(spec: dict, tmp_path) -> bytes:
    (kind, arg), = spec.items()
    if kind == "png_claiming":
        return png_claiming(*arg)
    if kind == "png_zeros":
        return png_zeros(*arg)
    if kind == "gif_claiming":
        return gif_claiming(*arg)
    if kind == "deep_json_record":
        blob = b"[" * arg + b"]" * arg
        return R.MAGIC + struct.pack("<I", len(blob)) + blob
    if kind == "deep_json_safetensors":
        blob = b"[" * arg + b"]" * arg
        return struct.pack("<Q", len(blob)) + blob
    if kind == "pickle_payload":
        return pickle.dumps(_Payload(str(tmp_path / "PWNED")))
    raise ValueError(f"unknown generator {kind!r}")


def entry_bytes(entry: dict, tmp_path) -> bytes:
    if "generate" in entry:
        return generate(entry["generate"], tmp_path)
    with open(os.path.join(FILES, entry["input"]), "rb") as f:
        return f.read()


def file_bytes(ref, tmp_path) -> bytes:
    """A checkpoint/tokenizer file: "@name" (a corpus file or a valid config), a generator, or inline text."""
    if isinstance(ref, dict):
        return generate(ref["generate"], tmp_path)
    if ref == "@valid_hf_config":
        return json.dumps(config_io.to_hf(CFG)).encode()
    if ref == "@valid_model_config":
        return json.dumps(CFG.to_dict()).encode()
    if ref.startswith("@"):
        with open(os.path.join(FILES, ref[1:]), "rb") as f:
            return f.read()
    return ref.encode()


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def maker(corpus):
    return ExampleMaker(Tokenizer.from_file(corpus[1]), CFG)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    root = base / "root"
    root.mkdir()
    with open(os.path.join(FILES, "images", "good.png"), "rb") as f:
        good = f.read()
    (root / "good.png").write_bytes(good)
    (base / "secret.png").write_bytes(good)  # readable, decodable, but outside the root
    os.symlink(base / "secret.png", root / "link.png")
    os.mkfifo(root / "fifo.png")  # reading it would block forever
    return str(root)


def _caption_record(name: str, blob: bytes) -> bytes:
    rec = R.Record(name, "hostile", "caption", (R.image(0), R.text("a photo")), (blob,))
    return R.serialize(rec, check=False)


# ---------------------------------------------------------------------------------------------
# one entry
# ---------------------------------------------------------------------------------------------
def _outcome(fn):
    """("ok", value) or ("error", exception); anything but an Exception (a crash) propagates."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the type is what the test checks
        return "error", e


def _check_error(entry, got):
    kind, value = got
    expect = entry["expect"]
    if expect.get("ok"):
        assert kind == "ok", f"{entry['name']}: expected acceptance, got {value!r}"
        return
    assert kind == "error", f"{entry['name']}: expected {expect['error']}, but it was accepted"
    assert type(value).__name__ in expect["error"].split("|"), f"{entry['name']}: {type(value).__name__}: {value}"
    assert isinstance(value, (ValueError, OSError, TypeError)), type(value).__mro__
    assert re.search(expect["match"], str(value)), f"{entry['name']}: message {str(value)!r}"


def run_image(entry, tmp_path, maker):
    data = entry_bytes(entry, tmp_path)
    name = os.path.basename(entry.get("input", entry["name"]))

    def decode():
        img = image_lib.load_image(data, name=name)
        return image_lib.to_rgb(img, (0, 0, 0), name=name)

    got = _outcome(decode)
    _check_error(entry, got)
    if got[0] == "error":
        assert image_error_reason(got[1]) == entry["expect"]["reason"]
    # the same bytes inside a record: the loader skips with that reason, or makes the example
    out = maker({"raw": _caption_record(entry["name"], data), "source": "hostile", "code": 0})
    assert out.get("skip") == entry["expect"].get("reason"), out.get("detail")


def run_record(entry, tmp_path, maker):
    data = entry_bytes(entry, tmp_path)
    out = maker({"raw": data, "source": "hostile", "code": 0})
    assert out.get("skip") == entry["expect"].get("reason"), (out.get("skip"), out.get("detail"))
    parsed = _outcome(lambda: R.deserialize(data))  # the parser alone: a RecordError, never anything else
    assert parsed[0] == "ok" or isinstance(parsed[1], R.RecordError), parsed


def run_conversation(entry, image_root):
    folder = build_cli.ImageFolder(image_root, image_lib.DEFAULT_MAX_PIXELS)
    got = _outcome(lambda: build_cli.make_record(entry["entry"], "llava", where=entry["name"], source="hostile",
                                                 task="sft", images=folder))
    assert got[0] == "error" and isinstance(got[1], R.RecordError), got
    assert got[1].reason == entry["expect"]["reason"], (got[1].reason, got[1].detail)


def run_config(entry, corpus):
    def build():
        cfg = tiny_config("stage2", corpus[0], corpus[1], **entry.get("overrides", {}))
        if "sources" in entry:
            cfg.data.sources = entry["sources"]
        validate.check(cfg)
        trainer.data_config(cfg)
        return Tokenizer.from_file(cfg.data.tokenizer)

    _check_error(entry, _outcome(build))


def run_files(entry, tmp_path):
    folder = tmp_path / "input"
    for rel, ref in entry["files"].items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(file_bytes(ref, tmp_path))
    if entry["kind"] == "tokenizer":
        (name,) = entry["files"]
        return _check_error(entry, _outcome(lambda: Tokenizer.from_file(str(folder / name))))

    def safetensors():
        reader = SafetensorsReader(str(folder))
        return [reader.get(k) for k in reader.keys()]

    call = {"safetensors": safetensors, "load_pretrained": lambda: load_pretrained(str(folder)),
            "load_orbax_params": lambda: load_orbax_params(str(folder))}[entry["call"]]
    _check_error(entry, _outcome(call))
    assert not (tmp_path / "PWNED").exists(), "a loader executed code from the checkpoint"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_hostile_input(entry, tmp_path, maker, corpus, image_root):
    kind = entry["kind"]
    if kind == "image":
        run_image(entry, tmp_path, maker)
    elif kind == "record":
        run_record(entry, tmp_path, maker)
    elif kind == "conversation":
        run_conversation(entry, image_root)
    elif kind == "config":
        run_config(entry, corpus)
    else:
        run_files(entry, tmp_path)


def test_corpus_is_large_and_small():
    """At least 25 inputs across all five kinds; committed files stay small (big ones are generated)."""
    kinds = collections.Counter(e["kind"] for e in ENTRIES)
    assert len(ENTRIES) >= 25 and {"image", "record", "conversation", "config", "checkpoint"} <= set(kinds)
    names = [e["name"] for e in ENTRIES]
    assert len(names) == len(set(names))
    for here, _, files in os.walk(FILES):
        for f in files:
            assert os.path.getsize(os.path.join(here, f)) <= 4096, f
    used = {e["input"] for e in ENTRIES if "input" in e}
    used |= {r[1:] for e in ENTRIES for r in e.get("files", {}).values() if isinstance(r, str) and r.startswith("@")}
    committed = {os.path.relpath(os.path.join(h, f), FILES) for h, _, fs in os.walk(FILES) for f in fs}
    assert committed - used <= {"images/good.png"}, sorted(committed - used)  # no orphan files


def test_loader_skips_the_planted_corpus_and_counts_each_reason(tmp_path, corpus):
    """Every record and image of the corpus in one shard: one epoch, nothing lost, every skip counted."""
    raws, expected, good = [], collections.Counter(), 0
    for e in ENTRIES:
        if e["kind"] not in ("record", "image"):
            continue
        data = entry_bytes(e, tmp_path)
        raws.append(data if e["kind"] == "record" else _caption_record(e["name"], data))
        if e["expect"].get("ok"):
            good += 1
        else:
            expected[e["expect"]["reason"]] += 1
    R.write_records(str(tmp_path / "hostile"), raws, num_shards=1)
    dc = L.DataConfig(sources=(SourceConfig("hostile", str(tmp_path / "hostile-*")),), pack=False, num_epochs=1,
                      max_images_per_row=1)
    it = L.make_train_iterator(dc, CFG, Tokenizer.from_file(corpus[1]), batch_size=1, seq_len=128, seed=0,
                               process_index=0, process_count=1)
    batches = list(it)
    stats = it.stats()
    assert dict(stats.skipped) == dict(expected)
    assert stats.examples == good
    for b in batches:
        assert all(np.isfinite(b[k]).all() for k in ("pixel_values", "high_res_pixel_values"))
    print(f"\nhostile corpus: {len(ENTRIES)} inputs; loader: {len(raws)} planted, {good} accepted, "
          f"{sum(expected.values())} skipped by reason {dict(expected)}")
