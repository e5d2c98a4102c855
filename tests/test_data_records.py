"""The record format: round trips, validation, ArrayRecord shards and the tfds route (no TensorFlow)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.data import loader as L
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic
from dsvl_jax.data.mixture import SourceConfig

RNG = np.random.default_rng(0)
IMG = synthetic.random_image(RNG, 12, 20)
KINDS = [
    synthetic.text_record(RNG, 0),
    synthetic.caption_record(RNG, 1, IMG),
    synthetic.interleaved_record(RNG, 2, [IMG, synthetic.random_image(RNG, 30, 8, "JPEG")]),
    synthetic.conversation_record(RNG, 3, [IMG], turns=2),
    R.Record("unicode", "src", "text", (R.text("ünïcödé ✓ 中文 \x00 nul and \n newlines"),)),
]


@pytest.mark.parametrize("rec", KINDS, ids=lambda r: r.record_id)
def test_round_trip(rec):
    data = R.serialize(rec)
    assert data.startswith(R.MAGIC)
    assert R.deserialize(data) == rec


@pytest.mark.parametrize("rec, reason", [
    (R.Record("a", "s", "t", ()), "empty record"),
    (R.Record("", "s", "t", (R.text("x"),)), "malformed header"),
    (R.Record("a", "s", "t", (R.text("x"), R.image(0))), "image count mismatch"),
    (R.Record("a", "s", "t", (R.image(1), R.image(0), R.text("x")), (IMG, IMG)), "image count mismatch"),
    (R.Record("a", "s", "t", (R.text("x"),), (IMG,)), "image count mismatch"),
    (R.Record("a", "s", "t", (R.text(" \n "),)), "empty text"),
    (R.Record("a", "s", "t", (R.text("q", "user"), R.text(" ", "assistant"))), "empty text"),
    (R.Record("a", "s", "t", (R.text("q", "user"), R.text("plain"))), "malformed header"),
    (R.Record("a", "s", "t", (R.text("q", "narrator"),)), "malformed header"),
    (R.Record("a", "s", "t", (R.text("bad \ud800"),)), "non-UTF-8 text"),
    (R.Record("a", "s", "t", (R.image(0), R.text("x")), (b"",)), "empty image bytes"),
])
def test_validation_reasons(rec, reason):
    with pytest.raises(R.RecordError) as e:
        R.validate(rec)
    assert e.value.reason == reason
    with pytest.raises(R.RecordError) as e:  # the reader applies the same rules to what it reads
        R.deserialize(R.serialize(rec, check=False))
    assert e.value.reason == reason


def test_corrupt_bytes():
    data = R.serialize(KINDS[1])
    for cut in (0, 5, 12, len(data) // 2, len(data) - 1):
        with pytest.raises(R.RecordError):
            R.deserialize(data[:cut])
    with pytest.raises(R.RecordError, match="truncated"):
        R.deserialize(data + b"extra")
    with pytest.raises(R.RecordError, match="not a record"):
        R.deserialize(b"X" + data[1:])
    # sizes that add up but are negative, and a header that is not an object
    header = {"id": "a", "source": "s", "task": "t", "segments": [{"image": 0}, {"text": "x", "role": None}],
              "image_bytes": [-5, len(IMG) + 5]}
    with pytest.raises(R.RecordError, match="malformed header"):
        R.deserialize(_raw(header, IMG))
    with pytest.raises(R.RecordError, match="malformed header"):
        R.deserialize(_raw([1, 2], b""))


def _raw(header, blob: bytes) -> bytes:
    import json
    import struct

    text = json.dumps(header).encode()
    return R.MAGIC + struct.pack("<I", len(text)) + text + blob


def test_array_record_shards(tmp_path):
    paths = R.write_records(str(tmp_path / "shard"), KINDS, num_shards=3)
    assert len(paths) == 3 and paths[0].endswith("-00000-of-00003.array_record")
    for spec in (str(tmp_path / "shard-*"), str(tmp_path), paths):
        src = R.array_record_source(spec)
        assert len(src) == len(KINDS)
        assert sorted(R.deserialize(src[i]).record_id for i in range(len(src))) == sorted(r.record_id for r in KINDS)
    with pytest.raises(FileNotFoundError):
        R.expand_paths(str(tmp_path / "nothing-*"))


def test_tfds_route(tmp_path):
    import tensorflow_datasets as tfds

    directory = R.write_tfds(str(tmp_path / "tfds"), "dsvl_test_corpus", KINDS)
    by_name = tfds.data_source("dsvl_test_corpus", data_dir=str(tmp_path / "tfds"), split="train")
    src = R.tfds_source(directory)
    assert len(src) == len(by_name) == len(KINDS)
    got = sorted(R.deserialize(src[i]).record_id for i in range(len(src)))
    assert got == sorted(R.deserialize(by_name[i][R.TFDS_FEATURE]).record_id for i in range(len(by_name)))
    assert got == sorted(r.record_id for r in KINDS)
    clone = pickle.loads(pickle.dumps(src))  # worker processes receive it pickled
    assert R.deserialize(clone[0]) == R.deserialize(src[0])


def test_loader_reads_tfds_like_array_record(tmp_path):
    tok = synthetic.corpus_tokenizer(str(tmp_path / "tok"))
    R.write_records(str(tmp_path / "ar"), KINDS)
    directory = R.write_tfds(str(tmp_path / "tfds"), "dsvl_loader_corpus", KINDS)
    rows = {}
    for name, src in [("ar", SourceConfig("k", paths=str(tmp_path / "ar-*"))),
                      ("tfds", SourceConfig("k", tfds_dir=directory))]:
        dc = L.DataConfig(sources=(src,), pack=False, num_epochs=1, max_images_per_row=2)
        it = L.make_train_iterator(dc, C.tiny(), tok, batch_size=1, seq_len=256, seed=0, process_index=0,
                                   process_count=1)
        rows[name] = sorted(b["input_ids"].tobytes() + b["pixel_values"].tobytes() for b in it)
        assert len(rows[name]) == len(KINDS) and it.stats().total_skipped == 0
    assert rows["ar"] == rows["tfds"]
