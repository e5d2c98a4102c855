"""Bounded-time fuzzing (hypothesis) of the three parsers untrusted data goes through: image decoding, the
record format and the tokenizer path (record -> chat template -> token ids -> example).

The property everywhere: a documented outcome — a result, or `ImageError` / `RecordError` / `ValueError`
— never another exception, a crash or a hang (each example has a deadline). Inputs are random bytes and,
far more effective, valid files and records with bytes flipped, cut, inserted or repeated.

Deterministic (`derandomize`) so CI never flakes; raise DSVL_FUZZ_EXAMPLES to search longer locally.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dsvl_jax import config as C
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic
from dsvl_jax.data.transforms import ExampleMaker
from dsvl_jax.processing import chat
from dsvl_jax.processing import image as image_lib

SCALE = int(os.environ.get("DSVL_FUZZ_EXAMPLES", "1"))
CFG = C.tiny()
MAX_PIXELS = 1 << 20  # what a fuzzed header may claim and still be decoded: keeps each example fast


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, deadline=datetime.timedelta(seconds=5), derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(fmt: str, mode: str = "RGB", size=(9, 7), **kw) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt, **kw)
    return buf.getvalue()


SEED_IMAGES = [_encode("PNG"), _encode("PNG", "RGBA"), _encode("PNG", "L"), _encode("JPEG", quality=80),
               _encode("JPEG", "L"), _encode("GIF", "L"), _encode("BMP"), _encode("TIFF"), _encode("WEBP"),
               _encode("PNG", "LA"), _encode("ICO", size=(16, 16))]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few edits: flip/overwrite bytes, cut, insert junk, duplicate a slice."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "cut", "insert", "repeat", "flip"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat" and data:
            n = draw(st.integers(1, 64))
            data[at:at] = data[at:at + n] * draw(st.integers(1, 8))
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# image decoding
# ---------------------------------------------------------------------------------------------
def _decode(data: bytes):
    try:
        img = image_lib.load_image(data, name="fuzz", max_pixels=MAX_PIXELS)
        rgb = image_lib.to_rgb(img, (127, 127, 127), name="fuzz")
    except image_lib.ImageError as e:
        assert str(e).startswith("fuzz: ")  # names its input
        return None
    assert rgb.mode == "RGB" and rgb.width * rgb.height <= MAX_PIXELS
    return rgb


@fuzz_settings(300)
@given(st.one_of(mutated(SEED_IMAGES), st.binary(max_size=512)))
def test_image_decode_only_raises_image_error(data):
    _decode(data)


@fuzz_settings(60)
@given(mutated(SEED_IMAGES))
def test_decoded_image_goes_through_the_processor(data):
    rgb = _decode(data)
    if rgb is not None:
        x = image_lib.to_unit_chw(image_lib.expand_to_square(image_lib.resize_long_side(rgb, 32), (127, 127, 127)))
        assert x.shape == (3, 32, 32) and np.isfinite(x).all()


# ---------------------------------------------------------------------------------------------
# the record format
# ---------------------------------------------------------------------------------------------
def _seed_records() -> list[bytes]:
    rng = np.random.default_rng(0)
    img = synthetic.random_image(rng, 8, 8)
    recs = [synthetic.text_record(rng, 0, n_words=5), synthetic.caption_record(rng, 1, img),
            synthetic.interleaved_record(rng, 2, [img, img]), synthetic.conversation_record(rng, 3, [img], turns=2)]
    return [R.serialize(r) for r in recs]


SEED_RECORDS = _seed_records()
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2, 1 << 40) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4),
                           max_leaves=12)
header_keys = st.sampled_from(["id", "source", "task", "segments", "image_bytes", "text", "role", "image"])


@st.composite
def forged_header(draw) -> bytes:
    """A header of the right shape with fields of the wrong types, and any image bytes after it."""
    seg = st.dictionaries(header_keys, json_values | st.integers(-1, 3), max_size=3)
    header = {"id": draw(json_values | st.text(max_size=6)), "source": draw(st.text(max_size=6) | json_values),
              "task": draw(st.sampled_from(["caption", "sft", ""]) | json_values),
              "segments": draw(st.lists(seg, max_size=4) | json_values),
              "image_bytes": draw(st.lists(st.integers(-3, 40), max_size=3) | json_values)}
    for k in draw(st.lists(st.sampled_from(list(header)), max_size=2)):
        header.pop(k, None)
    blob = json.dumps(header).encode()
    return R.MAGIC + struct.pack("<I", len(blob)) + blob + draw(st.binary(max_size=64))


def _parse(data: bytes):
    try:
        rec = R.deserialize(data)
    except R.RecordError as e:
        assert e.reason and isinstance(e.reason, str)
        return None
    assert R.deserialize(R.serialize(rec)) == rec  # what parses, re-serialises to the same record
    return rec


@fuzz_settings(400)
@given(st.one_of(mutated(SEED_RECORDS), forged_header(), st.binary(max_size=256)))
def test_record_parser_only_raises_record_error(data):
    _parse(data)


# ---------------------------------------------------------------------------------------------
# the tokenizer path: record -> template -> ids -> example (what the loader's workers run)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def maker(tmp_path_factory):
    return ExampleMaker(synthetic.corpus_tokenizer(str(tmp_path_factory.mktemp("tok"))), CFG)


SPECIALS = [chat.IMAGE_TAG, chat.BOS_TOKEN, chat.EOS_TOKEN, "User:", "Assistant:", "<image>", "\x00", "\ufffd"]
lone_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)  # not valid Unicode text
texts = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(SPECIALS) | st.text(max_size=6), max_size=6)
                  .map("".join), st.tuples(st.text(max_size=5), lone_surrogate, st.text(max_size=5)).map("".join))
GOOD_IMAGE = synthetic.random_image(np.random.default_rng(1), 8, 12)


@st.composite
def fuzzed_record(draw) -> bytes:
    roles = draw(st.sampled_from([[None], ["user", "assistant"], ["system", "user", "assistant"],
                                  [None, "user", "assistant", "system"]]))
    segments, images = [], []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) == 0:
            segments.append(R.image(len(images)))
            images.append(draw(st.sampled_from([GOOD_IMAGE]) | mutated([GOOD_IMAGE])))
        else:
            segments.append(R.text(draw(texts), draw(st.sampled_from(roles))))
    task = draw(st.sampled_from(["text", "caption", "interleaved", "sft", "unknown"]))
    return R.serialize(R.Record("f", "fuzz", task, tuple(segments), tuple(images)), check=False)


KNOWN_REASONS = {"malformed header", "empty record", "image count mismatch", "empty text", "non-UTF-8 text",
                 "empty image bytes", "undecodable image", "image too large", "unknown task tag",
                 "malformed conversation", "truncated record", "not a record"}


@fuzz_settings(150)
@given(fuzzed_record())
def test_tokenizer_path_gives_an_example_or_a_known_skip(maker, raw):
    out = maker({"raw": raw, "source": "fuzz", "code": 5})
    if "skip" in out:
        assert out["skip"] in KNOWN_REASONS, (out["skip"], out["detail"])  # never "unexpected <Error>"
        return
    ids, sup = out["ids"], out["supervised"]
    n_img = len(out["pixel_values"])
    assert ids.dtype == np.int32 and len(ids) == len(sup) and ((0 <= ids) & (ids < CFG.text.vocab_size)).all()
    image_tokens = ids == CFG.image_token_id
    assert image_tokens.sum() == n_img * CFG.num_image_tokens and not sup[image_tokens].any()
    for k in range(n_img):  # each image's run of tokens starts where the example says
        s = out["image_starts"][k]
        assert image_tokens[s:s + CFG.num_image_tokens].all()
    assert np.isfinite(out["pixel_values"]).all()


@fuzz_settings(300)
@given(texts)
def test_tokenizer_encodes_any_text_or_says_why(maker, text):
    tok = maker.tokenizer
    try:
        ids = tok.encode(text)
    except ValueError as e:  # only text that is not valid Unicode (lone surrogates)
        assert "surrogate" in str(e) or "Unicode" in str(e), e
        with pytest.raises(UnicodeEncodeError):
            text.encode("utf-8")
        return
    assert ids[0] == tok.bos_id and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special=False).removeprefix(tok.bos_token) == text  # byte-level BPE: lossless
