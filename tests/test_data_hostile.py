"""Bad inputs: the build tool rejects each with a counted reason; planted in a shard, the loader skips
each with a counted reason — never a crash, never a NaN, never a silently wrong example."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.data import build_cli
from dsvl_jax.data import loader as L
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.data.transforms import ExampleMaker
from dsvl_jax.processing import chat

CFG = C.tiny()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with (almost) no pixel data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


GOOD = synthetic.random_image(np.random.default_rng(0), 20, 30)
BAD_IMAGES = {
    "truncated.png": (GOOD[: len(GOOD) // 2], "undecodable image"),
    "zero.png": (b"", "empty image bytes"),
    "notimage.png": (b"this is plain text, not an image\n" * 10, "undecodable image"),
    "bomb.png": (png_claiming(30000, 30000), "image too large"),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return synthetic.corpus_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(GOOD)
    for name, (data, _) in BAD_IMAGES.items():
        (root / name).write_bytes(data)
    (tmp_path / "secret.png").write_bytes(GOOD)  # a readable image outside the root
    os.symlink(tmp_path / "secret.png", root / "link.png")
    return root


def _llava(image, human="<image>\nwhat is this?", answer="a cat", id_="x"):
    entry = {"id": id_, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image is not None:
        entry["image"] = image
    return entry


# ---------------------------------------------------------------------------------------------
# build tool
# ---------------------------------------------------------------------------------------------
def test_build_tool_rejects_each_bad_entry_with_its_reason(tmp_path, image_root):
    entries = [_llava("good.png", id_="good1"), _llava(["good.png", "good.png"], "<image><image> two?", id_="good2")]
    expected = {}

    def bad(entry, reason):
        entries.append(entry)
        expected[reason] = expected.get(reason, 0) + 1

    for name, (_, reason) in BAD_IMAGES.items():
        bad(_llava(name), reason)
    bad(_llava("good.png", "<image><image> two tags, one image"), "image count mismatch")
    bad(_llava(["good.png", "good.png"]), "image count mismatch")
    bad(_llava("good.png", f"{chat.IMAGE_TAG} the model's own tag in the text"), "image count mismatch")
    bad(_llava("../secret.png"), "image path outside image root")
    bad(_llava(str(image_root.parent / "secret.png")), "image path outside image root")
    bad(_llava("link.png"), "image path outside image root")  # a symlink that leaves the root
    bad(_llava("missing.png"), "missing image file")
    bad(_llava("good.png", answer="   "), "empty text")
    bad(_llava(None, human="hi", answer=""), "empty text")
    bad({"id": "turns", "image": "good.png", "conversations": [
        {"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}]},
        "malformed conversation")  # turns must alternate
    bad({"id": "nolist"}, "malformed entry")
    raw = json.dumps(entries, ensure_ascii=False).encode()
    # non-UTF-8 bytes inside one entry's text: only that entry is rejected
    raw = raw[:-1] + b', {"id": "latin1", "image": "good.png", "conversations": [{"from": "human", "value": ' \
        b'"<image>caf\xe9?"}, {"from": "gpt", "value": "ok"}]}]'
    expected["non-UTF-8 text"] = 1
    (tmp_path / "llava.json").write_bytes(raw)
    report = build_cli.build([str(tmp_path / "llava.json")], "llava", str(tmp_path / "out" / "sft"),
                             source="llava", image_root=str(image_root))
    assert report.written == 2
    assert dict(report.skipped) == expected
    src = R.array_record_source(report.outputs)
    got = sorted(R.deserialize(src[i]).record_id for i in range(len(src)))
    assert got == ["good1", "good2"]


def test_build_tool_other_formats(tmp_path, image_root):
    (tmp_path / "cap.json").write_text(json.dumps([
        {"id": "c1", "image": "good.png", "caption": "a red photo"},
        {"id": "c2", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                            {"from": "gpt", "value": "a long caption"}]},
        {"id": "c3", "image": "good.png", "caption": ""},
        {"id": "c4", "image": "zero.png", "caption": "zero"},
    ]))
    d1 = {"id": "d1", "content": [{"type": "text", "text": "page"}, {"type": "image", "image": "good.png"},
                                  {"text": " more"}, {"image": "good.png"}]}
    lines = [json.dumps(d1).encode(),
             b"{not json",
             json.dumps({"id": "d2", "content": [{"type": "image", "image": "missing.png"}, {"text": "x"}]}).encode(),
             b'{"id": "d3", "content": [{"text": "bad \xff bytes"}]}']
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines))
    (tmp_path / "plain.txt").write_text("first document\nstill first\n\nsecond document\n\n\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": ""}) + "\n")
    cases = [("caption", ["cap.json"], 2, {"empty text": 1, "empty image bytes": 1}),
             ("interleaved", ["docs.jsonl"], 1, {"malformed entry": 1, "missing image file": 1, "non-UTF-8 text": 1}),
             ("text", ["plain.txt", "plain.jsonl"], 3, {"empty text": 1})]
    for fmt, inputs, written, skipped in cases:
        report = build_cli.build([str(tmp_path / f) for f in inputs], fmt, str(tmp_path / fmt), source=fmt,
                                 image_root=str(image_root))
        assert (report.written, dict(report.skipped)) == (written, skipped), fmt
    src = R.array_record_source(str(tmp_path / "interleaved-*"))
    rec = R.deserialize(src[0])
    assert [s.text if not s.is_image else s.image for s in rec.segments] == ["page", 0, " more", 1]
    assert rec.task == "interleaved" and rec.images == (GOOD, GOOD)
    texts = sorted(R.deserialize(b).segments[0].text for b in R.array_record_source(str(tmp_path / "text-*")))
    assert texts == ["first document\nstill first", "second document", "third"]


def test_cli_report_and_sentencepiece(tmp_path, image_root, capsys):
    docs = [{"text": synthetic.sentence(np.random.default_rng(i), 30)} for i in range(50)] + [{"text": " "}]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out" / "text"
    rc = build_cli.main(["--format", "text", "--input", str(tmp_path / "plain.jsonl"), "--output", str(out),
                         "--num-shards", "2", "--spm-model", str(tmp_path / "spm" / "tokenizer.model"),
                         "--spm-vocab-size", "300"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "records written: 50" in printed and "records skipped: 1" in printed and "empty text" in printed
    report = json.loads((tmp_path / "out" / "text.report.json").read_text())
    assert report["written"] == 50 and report["skipped"] == {"empty text": 1} and len(report["outputs"]) == 2
    from dsvl_jax.processing.tokenizer import Tokenizer

    spm = Tokenizer.from_file(str(tmp_path / "spm" / "tokenizer.model"))
    assert spm.vocab_size == 300 and spm.decode(spm.encode("the cat")) == "the cat"


def test_tools_script_runs():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_dataset.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "--image-root" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the same (and worse) planted directly into a shard: the loader skips and counts
# ---------------------------------------------------------------------------------------------
def _caption(id_, blob, text="a photo", task="caption"):
    return R.Record(id_, "planted", task, (R.image(0), R.text(text)), (blob,))


def planted_records():
    """(serialised bytes, expected skip reason or None for a good record)."""
    good = [_caption(f"good{i}", synthetic.random_image(np.random.default_rng(i), 16, 24), f"photo {i}")
            for i in range(6)]
    out = [(R.serialize(r), None) for r in good]
    out += [(R.serialize(_caption(name, data), check=False), reason) for name, (data, reason) in BAD_IMAGES.items()]
    out += [(R.serialize(_caption("path", b"../../etc/passwd")), "undecodable image")]  # a path is not image bytes
    two_refs = R.Record("refs", "planted", "caption", (R.image(0), R.text("x"), R.image(1)), (GOOD,))
    out += [(R.serialize(two_refs, check=False), "image count mismatch")]
    out += [(R.serialize(_caption("tag", GOOD, f"{chat.IMAGE_TAG} inside text")), "image count mismatch")]
    out += [(R.serialize(_caption("empty", GOOD, "  "), check=False), "empty text")]
    out += [(R.serialize(_caption("surrogate", GOOD, "bad \udcff text"), check=False), "non-UTF-8 text")]
    out += [(R.serialize(_caption("task", GOOD, task="unheard_of")), "unknown task tag")]
    turns = R.Record("turns", "planted", "sft",
                     (R.text("a", "assistant"), R.text("b", "user"), R.text("c", "assistant")))
    out += [(R.serialize(turns), "malformed conversation")]
    whole = R.serialize(good[0])
    out += [(whole[: len(whole) - 7], "truncated record"), (b"", "truncated record"),
            (b"\x00garbage bytes that are not a record at all", "not a record"),
            (R.MAGIC + struct.pack("<I", 5) + b"{oops", "malformed header")]
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_loader_skips_planted_records(tmp_path, tok, pack):
    planted = planted_records()
    R.write_records(str(tmp_path / "planted"), [b for b, _ in planted], num_shards=2)
    dc = L.DataConfig(sources=(SourceConfig("planted", str(tmp_path / "planted-*")),), pack=pack, num_epochs=1,
                      max_images_per_row=2)
    it = L.make_train_iterator(dc, CFG, tok, batch_size=1, seq_len=48, seed=3, process_index=0, process_count=1)
    rows = list(it)
    expected = {}
    for _, reason in planted:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    stats = it.stats()
    assert dict(stats.skipped) == expected
    # every good record appears exactly once, intact; nothing else does
    maker = ExampleMaker(tok, CFG)
    want = {R.deserialize(b).record_id: maker.make(R.deserialize(b)) for b, reason in planted if reason is None}
    seen = []
    for batch in rows:
        for key in ("loss_mask", "pixel_values", "high_res_pixel_values"):
            assert np.isfinite(batch[key]).all()
        row = {k: v[0] for k, v in batch.items()}
        slot = 0
        for seg in range(1, row["segment_ids"].max() + 1):
            ids = row["input_ids"][row["segment_ids"] == seg]
            match = [rid for rid, ex in want.items() if np.array_equal(ex["ids"], ids)]
            assert len(match) == 1
            ex = want[match[0]]
            seen.append(match[0])
            np.testing.assert_array_equal(row["high_res_pixel_values"][slot], ex["high_res_pixel_values"][0])
            slot += 1
        assert row["image_mask"].sum() == slot
    assert sorted(seen) == sorted(want)
    assert stats.examples == len(want)
    # the record log: codes name exactly these records; skipped codes name the planted ones
    codes = [c for b in rows for c in b["record_index"].ravel() if c >= 0]
    assert sorted(it.record_key(c) for c in codes) == sorted(("planted", rid) for rid in want)
    for skip in stats.recent:  # skipped codes name planted records too (the unreadable ones by reason)
        source, rid = it.record_key(skip["code"])
        assert source == "planted" and rid == (skip["record_id"] or f"<unreadable record: {skip['reason']}>")
