"""Parity with transformers' DeepSeek-VL processors, configured as the HF port of the released checkpoints.

1.3B: `DeepseekVLImageProcessorPil(image_mean=0.5, image_std=0.5)` (384, bicubic, background 127).
7B: `DeepseekVLHybridImageProcessorPil(image_mean=0.5, image_std=0.5, high_res_image_mean/std=CLIP,
resample=BILINEAR)` (1024 bicubic + 384 bilinear, background (122,116,104)), as the HF converters set them.

Intended differences (see dsvl_jax/processing/image.py): the official floor size rule vs HF's round, and
the 7B low-res view (float resize as the official tower vs PIL uint8 bilinear in HF). Elsewhere: equal.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dsvl_jax.config import CLIP_MEAN, CLIP_STD, deepseek_vl_1p3b, deepseek_vl_7b
from dsvl_jax.processing import image as im
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers.image_transforms import resize as hf_np_resize  # noqa: E402
from transformers.image_utils import ChannelDimension  # noqa: E402

# shared/ lies beside the repository (dev machines and CI); never copied into it.
EXAMPLES = os.environ.get("DSVL_EXAMPLES", os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "deepseek_vl_examples")))
HALF = [0.5, 0.5, 0.5]
# PIL's 8-bit bilinear rounds after each of its two passes: ≤ 1 grey level, i.e. 2/255 after (x-0.5)/0.5.
LOW_RES_BOUND = 2.0 / 255.0 + 1e-6


def official_hw(h, w, size, min_size=14):
    """The official VLMImageProcessor size rule, written out here independently of the package."""
    return max(int(h / max(h, w) * size), min_size), max(int(w / max(h, w) * size), min_size)


def hf_hw(h, w, size, min_size=14):
    return max(round(h * (size / max(h, w))), min_size), max(round(w * (size / max(h, w))), min_size)


def with_official_size_rule(klass):
    """The HF PIL processor with only its size rule swapped for the official floor."""
    class Floor(klass):
        def resize(self, image, size, min_size, resample=None, **kwargs):
            h, w = image.shape[-2:]
            return hf_np_resize(image, size=official_hw(h, w, size.height, min_size),
                                resample=resample or self.resample, data_format=ChannelDimension.FIRST,
                                input_data_format=ChannelDimension.FIRST)
    return Floor


def hf_image_processors(floor=False):
    one = transformers.DeepseekVLImageProcessorPil
    hybrid = transformers.DeepseekVLHybridImageProcessorPil
    if floor:
        one, hybrid = with_official_size_rule(one), with_official_size_rule(hybrid)
    return (one(image_mean=HALF, image_std=HALF),
            hybrid(image_mean=HALF, image_std=HALF, high_res_image_mean=list(CLIP_MEAN),
                   high_res_image_std=list(CLIP_STD), resample=Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_bpe_tokenizer(sample_corpus(1500), 1024, d)
    return d


@pytest.fixture(scope="module")
def setups(tok_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ip13, ip7 = hf_image_processors()
    out = {}
    for name, cfg, hf_cls, ip in (("1.3b", deepseek_vl_1p3b(), transformers.DeepseekVLProcessor, ip13),
                                  ("7b", deepseek_vl_7b(), transformers.DeepseekVLHybridProcessor, ip7)):
        ours = Processor.from_pretrained(tok_dir, cfg.replace(image_token_id=hf_tok.convert_tokens_to_ids(
            "<image_placeholder>")))
        theirs = hf_cls(image_processor=ip, tokenizer=hf_tok, num_image_tokens=cfg.num_image_tokens)
        out[name] = (ours, theirs)
    return out


def synthetic_images():
    """(image, what) with sizes where floor and round agree at 384 and 1024, in several modes."""
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (300, 400, 4), dtype=np.uint8)
    rgba[:50, :, 3] = 0
    rgba[50:100, :, 3] = 100
    pal = Image.fromarray(rng.randint(0, 256, (200, 200, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    images = [(Image.fromarray(rgba, "RGBA"), "rgba 400x300"),
              (Image.fromarray(rng.randint(0, 256, (1000, 100), dtype=np.uint8), "L"), "grey 100x1000"),
              (pal, "palette 200x200"),
              (Image.fromarray(rng.randint(0, 256, (512, 1024, 3), dtype=np.uint8)), "rgb 1024x512 (downscale)"),
              (Image.fromarray(rng.randint(0, 256, (37, 74, 3), dtype=np.uint8)), "rgb 74x37 (upscale)")]
    for img, what in images:
        w, h = img.size
        for size in (384, 1024):
            assert official_hw(h, w, size) == hf_hw(h, w, size), what
    return images


def conversations(images):
    a, b, c, d, e = images
    return [
        [{"role": "User", "content": "<image_placeholder>Describe the image.", "images": [a]},
         {"role": "Assistant", "content": ""}],
        [{"role": "User", "content": "What is 12 + 30?"}, {"role": "Assistant", "content": "42"},
         {"role": "User", "content": "And doubled?"}, {"role": "Assistant", "content": ""}],
        [{"role": "User", "content": "<image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\n"
                                     "Which is brighter?", "images": [b, c]},
         {"role": "Assistant", "content": "The second."},
         {"role": "User", "content": "<image_placeholder><image_placeholder>And these?", "images": [d, e]},
         {"role": "Assistant", "content": ""}],
    ]


def run_both(ours, theirs, convs):
    mine = ours(convs)
    texts = [ours.format(c) for c in convs]
    rgb = [im.to_rgb(img, ours.background) for c in convs for m in c for img in m.get("images", [])]
    ref = theirs(text=texts, images=rgb, padding=True, padding_side="left", return_tensors="np")
    return mine, ref


@pytest.mark.parametrize("model", ["1.3b", "7b"])
def test_batch_matches_hf_processor(setups, model):
    ours, theirs = setups[model]
    images = synthetic_images()
    mine, ref = run_both(ours, theirs, conversations([img for img, _ in images]))
    np.testing.assert_array_equal(mine["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(mine["attention_mask"], ref["attention_mask"])
    assert mine["input_ids"].shape[1] > 4 * ours.num_image_tokens
    if model == "1.3b":
        np.testing.assert_allclose(mine["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
        return
    np.testing.assert_allclose(mine["high_res_pixel_values"], ref["high_res_pixel_values"], rtol=0, atol=1e-6)
    # Low-res view: ours is the official float resize; HF's is PIL's uint8 bilinear of the same square.
    unit = np.concatenate([mine["images"][i, mine["images_emb_mask"][i].any(-1)] for i in range(3)])
    official = torch.nn.functional.interpolate(torch.from_numpy(unit), size=(384, 384), mode="bilinear",
                                               align_corners=False, antialias=True).numpy()
    official = (official - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_allclose(mine["pixel_values"], official, rtol=0, atol=1e-6)
    diff = np.abs(mine["pixel_values"] - ref["pixel_values"]).max()
    assert diff <= LOW_RES_BOUND, f"low-res view differs from HF by {diff}"


def example_paths():
    if not os.path.isdir(EXAMPLES):
        pytest.skip(f"example images not found at {EXAMPLES} (shared data is not part of the repo)")
    names = sorted(n for n in os.listdir(EXAMPLES) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    assert names, f"no images in {EXAMPLES}"
    return [os.path.join(EXAMPLES, n) for n in names]


def test_real_example_images(setups):
    paths = example_paths()
    floor13, floor7 = hf_image_processors(floor=True)
    plain13, plain7 = hf_image_processors()
    ours13, ours7 = setups["1.3b"][0], setups["7b"][0]
    n_disagree = 0
    for path in paths:
        raw = im.load_image(path)
        w, h = raw.size
        rgb13, rgb7 = im.to_rgb(raw, ours13.background), im.to_rgb(raw, ours7.background)
        # 1.3B: the official chain equals HF's with the official size rule, bit for bit.
        x13 = ours13.unit_image(path)
        mine13 = im.model_views(x13, ours13.config)["pixel_values"]
        np.testing.assert_allclose(mine13, floor13(rgb13, return_tensors="np")["pixel_values"][0], rtol=0, atol=1e-6)
        x7 = ours7.unit_image(path)
        mine7 = im.model_views(x7, ours7.config)
        ref7 = floor7(rgb7, return_tensors="np")
        np.testing.assert_allclose(mine7["high_res_pixel_values"], ref7["high_res_pixel_values"][0], rtol=0, atol=1e-6)
        assert np.abs(mine7["pixel_values"] - ref7["pixel_values"][0]).max() <= LOW_RES_BOUND
        # Unmodified HF: identical wherever the two size rules agree.
        if official_hw(h, w, 384) == hf_hw(h, w, 384):
            ref13 = plain13(rgb13, return_tensors="np")["pixel_values"][0]
            np.testing.assert_allclose(mine13, ref13, rtol=0, atol=1e-6)
        else:
            n_disagree += 1
        if official_hw(h, w, 1024) == hf_hw(h, w, 1024):
            hi = plain7(rgb7, return_tensors="np")["high_res_pixel_values"][0]
            np.testing.assert_allclose(mine7["high_res_pixel_values"], hi, rtol=0, atol=1e-6)
    assert n_disagree < len(paths)


def test_real_images_through_both_processors(setups):
    paths = [p for p in example_paths() if os.path.basename(p) in ("app.png", "monday.jpg")]
    if len(paths) < 2:
        pytest.skip("app.png / monday.jpg not in the examples folder")
    ours, theirs = setups["7b"]
    conv = [{"role": "User", "content": "<image_placeholder>What app is this?\n<image_placeholder>Why is it funny?",
             "images": paths}, {"role": "Assistant", "content": ""}]
    mine = ours(conv)
    ref = theirs(text=[ours.format(conv)], images=[im.to_rgb(im.load_image(p), ours.background) for p in paths],
                 return_tensors="np")
    np.testing.assert_array_equal(mine["input_ids"], ref["input_ids"])
    np.testing.assert_allclose(mine["high_res_pixel_values"], ref["high_res_pixel_values"], rtol=0, atol=1e-6)
    assert np.abs(mine["pixel_values"] - ref["pixel_values"]).max() <= LOW_RES_BOUND


@pytest.mark.parametrize("model", ["1.3b", "7b"])
def test_exported_processor_config_loads_in_transformers(setups, tok_dir, tmp_path, model):
    import shutil

    from dsvl_jax.processing.processor import write_hf_processor_config

    ours, configured = setups[model]
    folder = tmp_path / "hf"
    shutil.copytree(tok_dir, folder)
    write_hf_processor_config(folder, ours.config)
    loaded = transformers.AutoProcessor.from_pretrained(str(folder))
    assert type(loaded) is type(configured) and loaded.num_image_tokens == ours.num_image_tokens
    assert loaded.image_processor.to_dict() == configured.image_processor.to_dict()
    images = [im.to_rgb(img, ours.background) for img, _ in synthetic_images()[:2]]
    text = ["User: <image_placeholder><image_placeholder>Compare.\n\nAssistant:"]
    a = loaded(text=text, images=images, return_tensors="np")
    b = configured(text=text, images=images, return_tensors="np")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["input_ids"], ours(text, images=[images])["input_ids"])
