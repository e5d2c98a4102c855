"""`Processor` batches on the tiny configs: layout of every output, and the errors raised up front."""
from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

import dsvl_jax
from dsvl_jax.config import tiny
from dsvl_jax.convert import config_io
from dsvl_jax.processing import image as im
from dsvl_jax.processing.processor import Processor, expand_image_tokens
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_bpe_tokenizer(sample_corpus(800), 512, d)  # image id 511 = tiny()'s image_token_id
    return d


@pytest.fixture(scope="module")
def proc(tok_dir):
    return Processor.from_pretrained(tok_dir, tiny(hybrid=True))


def solid(color, size=(20, 12)):
    return Image.new("RGB", size, color)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 2, 9, 3], 9, 3) == [1, 9, 9, 9, 2, 9, 9, 9, 3]
    assert expand_image_tokens([1, 2], 9, 4) == [1, 2]
    with pytest.raises(ValueError):
        expand_image_tokens([9], 9, 0)


def test_batch_layout_hybrid(proc, tmp_path):
    cfg = proc.config
    n_tok = cfg.num_image_tokens
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    path = tmp_path / "blue.png"
    path.write_bytes(png(solid(blue)))
    convs = [
        [{"role": "User", "content": "<image_placeholder>first", "images": [solid(red)]},
         {"role": "Assistant", "content": ""}],
        [{"role": "User", "content": "no image here, a longer question about nothing at all"},
         {"role": "Assistant", "content": ""}],
        [{"role": "User", "content": "<image_placeholder> and <image_placeholder>?", "images": [solid(green), path]},
         {"role": "Assistant", "content": ""}],
    ]
    out = proc(convs)
    b, t = out["input_ids"].shape
    assert b == 3 and out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    tok = proc.tokenizer
    for i, conv in enumerate(convs):
        ids = expand_image_tokens(tok.encode(proc.format(conv)), tok.image_token_id, n_tok)
        row = out["input_ids"][i]
        np.testing.assert_array_equal(row[t - len(ids):], ids)           # left padding
        assert (row[: t - len(ids)] == tok.pad_id).all()
        assert out["attention_mask"][i].tolist() == [0] * (t - len(ids)) + [1] * len(ids)
        assert row[t - len(ids)] == tok.bos_id
    np.testing.assert_array_equal(out["images_seq_mask"], out["input_ids"] == tok.image_token_id)
    assert out["images_seq_mask"].sum(1).tolist() == [n_tok, 0, 2 * n_tok]
    # Official contract: [B, N_max, ...] with zero dummies.
    assert out["images"].shape == (3, 2, 3, 64, 64) and out["images_emb_mask"].shape == (3, 2, n_tok)
    assert out["images_emb_mask"].all(-1).tolist() == [[True, False], [False, False], [True, True]]
    assert (out["images"][0, 1] == 0).all() and (out["images"][1] == 0).all()
    # HF-port contract: all real images, row-major over the batch, in text order.
    assert out["pixel_values"].shape == (3, 3, 32, 32) and out["high_res_pixel_values"].shape == (3, 3, 64, 64)
    real = np.stack([out["images"][0, 0], out["images"][2, 0], out["images"][2, 1]])
    views = im.model_views(real, cfg)
    np.testing.assert_array_equal(out["pixel_values"], views["pixel_values"])
    np.testing.assert_array_equal(out["high_res_pixel_values"], views["high_res_pixel_values"])
    centre = real[:, :, 32, 32]
    np.testing.assert_allclose(centre, np.array([red, green, blue]) / 255, atol=1e-7)
    # padding colour of the 7B processor (CLIP mean) above the 20×12 image
    np.testing.assert_allclose(real[0, :, 0, 32], np.array((122, 116, 104)) / 255, atol=1e-7)


def test_siglip_only_prompts_sources_and_padding(tok_dir):
    proc = Processor.from_pretrained(tok_dir, tiny(hybrid=False))
    data = png(solid((10, 20, 30)))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    prompts = ["User: <image_placeholder><image_placeholder>x\n\nAssistant:", "User: y\n\nAssistant:"]
    out = proc(prompts, images=[[data, uri], []], pad_to_multiple_of=8)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "images", "images_seq_mask",
                        "images_emb_mask"}
    assert out["input_ids"].shape[1] % 8 == 0
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(out["pixel_values"], (out["images"][0] - np.float32(0.5)) / np.float32(0.5))
    fixed = proc(prompts[1], max_length=40, padding="max_length")
    assert fixed["input_ids"].shape == (1, 40) and fixed["images"].shape == (1, 1, 3, 32, 32)
    assert fixed["pixel_values"].shape == (0, 3, 32, 32) and not fixed["images_emb_mask"].any()


def test_conversation_images_via_argument(proc):
    conv = [{"role": "User", "content": "<image_placeholder>hi"}, {"role": "Assistant", "content": ""}]
    out = proc(conv, images=[solid((1, 2, 3))])
    assert out["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="both in the messages and in `images=`"):
        proc([dict(conv[0], images=[solid((1, 2, 3))]), conv[1]], images=[solid((1, 2, 3))])


def test_exported_from_the_package(proc):
    assert dsvl_jax.Processor is Processor


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_missing_and_unreadable_images_are_named(proc, tmp_path):
    conv = [{"role": "User", "content": "<image_placeholder>x", "images": [str(tmp_path / "missing.jpg")]},
            {"role": "Assistant", "content": ""}]
    ok = [{"role": "User", "content": "fine"}, {"role": "Assistant", "content": ""}]
    with pytest.raises(im.ImageError, match=r"sample 1, image 0: .*missing\.jpg.*not found"):
        proc([ok, conv])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    conv[0]["images"] = [str(bad)]
    with pytest.raises(im.ImageError, match=r"sample 0, image 0: .*bad\.png"):
        proc(conv)


def test_placeholder_and_image_counts_must_match(proc):
    two_tags = [{"role": "User", "content": "<image_placeholder><image_placeholder>", "images": [solid((0, 0, 0))]},
                {"role": "Assistant", "content": ""}]
    with pytest.raises(ValueError, match="sample 0: 2 '<image_placeholder>' placeholder.* but 1 image"):
        proc(two_tags)
    no_tag = [{"role": "User", "content": "look", "images": [solid((0, 0, 0))]}, {"role": "Assistant", "content": ""}]
    with pytest.raises(ValueError, match="sample 0: 0 .* but 1 image"):
        proc(no_tag)
    with pytest.raises(ValueError, match="one list per sample"):
        proc(["a", "b"], images=[[]])


def test_too_long_for_max_length_or_context(proc, tok_dir):
    conv = [{"role": "User", "content": "<image_placeholder>" + " word" * 50, "images": [solid((5, 5, 5))]},
            {"role": "Assistant", "content": ""}]
    n = len(proc(conv)["input_ids"][0])
    with pytest.raises(ValueError, match=f"sample 0: {n} tokens .* exceed max_length={n - 1}"):
        proc(conv, max_length=n - 1)
    short_ctx = tiny().replace(text=dataclasses.replace(tiny().text, max_position_embeddings=n - 5))
    with pytest.raises(ValueError, match=r"exceed the model context \(%d positions\)" % (n - 5)):
        Processor.from_pretrained(tok_dir, short_ctx)(conv)
    with pytest.raises(ValueError, match="needs max_length"):
        proc(conv, padding="max_length")


def test_tokenizer_and_config_must_agree(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="id 511 but the model config says image_token_id=100015"):
        Processor.from_pretrained(tok_dir, tiny().replace(image_token_id=100015))
    small_vocab = tiny().replace(text=dataclasses.replace(tiny().text, vocab_size=500))
    with pytest.raises(ValueError, match="512 ids but the model embeds only text.vocab_size=500"):
        Processor.from_pretrained(tok_dir, small_vocab)
    with pytest.raises(FileNotFoundError, match="pass config="):
        Processor.from_pretrained(tok_dir)


def test_from_pretrained_reads_a_vlmconfig_or_hf_config_json(tok_dir, tmp_path):
    d = tmp_path / "model"
    build_bpe_tokenizer(sample_corpus(200), 512, d)
    (d / "config.json").write_text(json.dumps(tiny(hybrid=False).to_dict()))
    proc = Processor.from_pretrained(d)
    assert not proc.config.is_hybrid and proc.image_size == 32
    # an HF-port config.json is read as well (config files only: this folder has no weights)
    (d / "config.json").write_text(json.dumps(config_io.to_hf(tiny())))
    proc = Processor.from_pretrained(d)
    assert proc.config.is_hybrid and proc.config.image_token_id == 511
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_vl_hybrid"}))
    with pytest.raises(ValueError, match=r"config\.json: missing or malformed 'text_config'"):
        Processor.from_pretrained(d)
