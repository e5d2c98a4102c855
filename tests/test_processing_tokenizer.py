"""Tokenizers built in the test (byte-level BPE tokenizer.json and sentencepiece): special tokens, ids,
round trips, loss-mask segments, and loading by transformers."""
from __future__ import annotations

import json

import pytest

from dsvl_jax.processing.chat import BOS_TOKEN, EOS_TOKEN, IMAGE_TAG, format_prompt, render_segments
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus, train_sentencepiece

CONV = [{"role": "User", "content": "<image_placeholder>What does the chart show? 你好"},
        {"role": "Assistant", "content": "A red bar at 2024, up 15%."},
        {"role": "User", "content": "<image_placeholder> and\n\nthis one?"},
        {"role": "Assistant", "content": ""}]
TRICKY = [
    "plain text",
    "abc<｜end▁of▁sentence｜>def",
    "<image_placeholder><image_placeholder>x<image_placeholder>",
    "<｜begin▁of▁sentence｜>nested BOS in text",
    "near miss: <｜end of sentence｜> <image placeholder> <image_placeholder",
    "unicode ✓ é ß 图表 🙂 and\ttabs\n\n\nnewlines   spaces",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    build_bpe_tokenizer(sample_corpus(1500), 1024, d, extra_special_tokens=("<｜fim▁hole｜>",))
    return d


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return Tokenizer.from_file(bpe_dir)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return train_sentencepiece(sample_corpus(1500), 600, tmp_path_factory.mktemp("spm") / "tok.model")


def test_bpe_layout_matches_the_release_order(bpe, bpe_dir):
    assert bpe.kind == "tokenizers" and bpe.vocab_size == 1024 == len(bpe)
    ids = (bpe.bos_id, bpe.eos_id, bpe.token_to_id("<｜fim▁hole｜>"), bpe.image_token_id)
    assert ids == (1020, 1021, 1022, 1023)
    assert bpe.pad_id == bpe.eos_id
    assert bpe.token_to_id("no-such-token-xyz") is None
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS_TOKEN and config["eos_token"] == EOS_TOKEN and config["add_bos_token"]
    assert config["extra_special_tokens"] == {"image_token": IMAGE_TAG}
    assert config["added_tokens_decoder"]["1023"]["content"] == IMAGE_TAG
    special_map = json.loads((bpe_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert IMAGE_TAG in special_map["additional_special_tokens"]


def test_tiny_model_layout_and_small_corpus_fill(tmp_path):
    tok = build_bpe_tokenizer(["ab ab ab"], 300, tmp_path / "t.json")
    assert tok.vocab_size == 300 and tok.image_token_id == 299  # tiny(): vocab 512 / image 511 pattern
    assert (tok.bos_id, tok.eos_id) == (297, 298)
    assert tok.token_to_id("<｜reserved▁0｜>") is not None
    assert tok.decode(tok.encode("zzz ab ✓")) == "zzz ab ✓"
    with pytest.raises(ValueError, match="too small"):
        build_bpe_tokenizer(["ab"], 200, tmp_path / "u")
    with pytest.raises(ValueError, match="non-empty"):
        build_bpe_tokenizer([], 400, tmp_path / "v")


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_special_tokens_are_never_split(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode("abc<｜end▁of▁sentence｜>def", add_bos=False)
    assert ids.count(tok.eos_id) == 1
    ids = tok.encode("<image_placeholder><image_placeholder>x<image_placeholder>", add_bos=False)
    assert ids.count(tok.image_token_id) == 3 and ids[:2] == [tok.image_token_id] * 2
    ids = tok.encode(TRICKY[4], add_bos=False)
    assert tok.eos_id not in ids and tok.image_token_id not in ids
    assert tok.encode("x")[0] == tok.bos_id and tok.encode("x", add_bos=False)[0] != tok.bos_id
    assert tok.encode(BOS_TOKEN, add_bos=False) == [tok.bos_id]


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_round_trips(which, request):
    tok = request.getfixturevalue(which)
    for text in TRICKY + [format_prompt(CONV)]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=False) == BOS_TOKEN + text
        specials = (BOS_TOKEN, EOS_TOKEN, IMAGE_TAG)
        stripped = text
        for s in specials:
            stripped = stripped.replace(s, "")
        assert tok.decode(ids) == stripped


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_encode_segments_gives_the_same_ids_and_masks_answers(which, request):
    tok = request.getfixturevalue(which)
    conv = [{"role": "User", "content": "<image_placeholder>What is shown?"},
            {"role": "Assistant", "content": "A dog, 3 cats."},
            {"role": "User", "content": "Colour?"}, {"role": "Assistant", "content": "Blue"}]
    segs = render_segments(conv)
    ids, roles = tok.encode_segments(segs)
    assert ids == tok.encode(format_prompt(conv))
    assert roles[0] == "bos" and len(roles) == len(ids)
    supervised = [i for i, r in zip(ids, roles) if r == "assistant"]
    # exactly the answers with their EOS: decoding them gives the answer texts
    expected = " A dog, 3 cats.<｜end▁of▁sentence｜> Blue<｜end▁of▁sentence｜>"
    assert tok.decode(supervised, skip_special=False) == expected
    assert supervised.count(tok.eos_id) == 2
    assert tok.image_token_id not in supervised


def test_sentencepiece_layout_and_whitespace(spm):
    assert spm.kind == "sentencepiece" and spm.vocab_size == 600
    assert (spm.bos_id, spm.eos_id, spm.image_token_id, spm.pad_id) == (1, 2, 3, 2)
    text = "User: a\n\nAssistant: b"
    assert spm.decode(spm.encode(text)) == text  # "\n\n" and single spaces survive (no normalisation)


def test_hf_tokenizers_load_the_folder_and_agree(bpe, bpe_dir):
    transformers = pytest.importorskip("transformers")
    for loader in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = loader.from_pretrained(str(bpe_dir))
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
        assert hf.image_token == IMAGE_TAG and hf.convert_tokens_to_ids(IMAGE_TAG) == bpe.image_token_id
        assert len(hf) == bpe.vocab_size
        for text in TRICKY + [format_prompt(CONV)]:
            assert hf(text)["input_ids"] == bpe.encode(text), text
            assert hf.decode(bpe.encode(text), skip_special_tokens=True) == bpe.decode(bpe.encode(text))


def test_from_file_errors(tmp_path, bpe_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: cannot load tokenizer"):
        Tokenizer.from_file(broken)
    raw = json.loads((bpe_dir / "tokenizer.json").read_text(encoding="utf-8"))
    no_eos = dict(raw, added_tokens=[t for t in raw["added_tokens"] if t["content"] != EOS_TOKEN])
    (tmp_path / "no_eos.json").write_text(json.dumps(no_eos), encoding="utf-8")
    with pytest.raises(ValueError, match="no_eos.json: EOS token '<｜end▁of▁sentence｜>' is not in the vocab"):
        Tokenizer.from_file(tmp_path / "no_eos.json")


def test_missing_image_tag_is_appended_like_the_official_processor(bpe_dir, tmp_path):
    raw = json.loads((bpe_dir / "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != IMAGE_TAG]
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.warns(UserWarning, match="was not in the vocabulary; added it as id 1023"):
        tok = Tokenizer.from_file(tmp_path)
    assert tok.image_token_id == 1023 and tok.encode("a<image_placeholder>b", add_bos=False).count(1023) == 1


def test_the_trainer_copies_a_tokenizer_under_the_name_the_workdir_is_read_by(spm, bpe_dir, tmp_path):
    # dsvl-chat / Processor / dsvl-convert read a training workdir with Tokenizer.from_file(workdir).
    from dsvl_jax.train.trainer import _copy_tokenizer
    for name, src in (("spm", str(spm.source)), ("bpe", str(bpe_dir / "tokenizer.json"))):
        workdir = tmp_path / name
        workdir.mkdir()
        _copy_tokenizer(src, str(workdir))
        want = Tokenizer.from_file(src)
        got = Tokenizer.from_file(str(workdir))
        assert got.kind == want.kind and got.encode(TRICKY[-1]) == want.encode(TRICKY[-1])
