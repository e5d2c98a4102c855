"""Image decoding, mode conversion and the official geometry, checked against hand-computed pixels."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dsvl_jax.config import CLIP_MEAN, SIGLIP_MEAN, deepseek_vl_1p3b, tiny
from dsvl_jax.processing import image as im

BG = (122, 116, 104)


def png_bytes(img: Image.Image, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save_kw)
    return buf.getvalue()


def rgb_array(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)


def over(fg, a, bg):
    """Straight alpha over an opaque background, rounded to nearest (float reference)."""
    fg, a, bg = np.asarray(fg, float), np.asarray(a, float)[..., None] / 255.0, np.asarray(bg, float)
    return np.floor(fg * a + bg * (1 - a) + 0.5).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# to_rgb: every mode against expected pixels
# ------------------------------------------------------------------------------------------------
def test_rgba_is_composited_on_the_background():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [10, 250, 90, 1]]], np.uint8)
    out = rgb_array(im.to_rgb(Image.fromarray(rgba, "RGBA"), BG))
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == list(BG)
    np.testing.assert_array_equal(out, over(rgba[..., :3], rgba[..., 3], BG))


def test_la_and_premultiplied_modes():
    la = np.array([[[40, 255], [40, 0], [40, 64]]], np.uint8)
    out = rgb_array(im.to_rgb(Image.fromarray(la, "LA"), BG))
    np.testing.assert_array_equal(out, over(np.repeat(la[..., :1], 3, -1), la[..., 1], BG))
    # RGBa stores colour × alpha; PIL un-premultiplies, then we composite.
    rgba = Image.fromarray(np.array([[[100, 50, 25, 255], [0, 0, 0, 0]]], np.uint8), "RGBA")
    out = rgb_array(im.to_rgb(rgba.convert("RGBa"), BG))
    assert out[0, 0].tolist() == [100, 50, 25] and out[0, 1].tolist() == list(BG)
    la_pre = Image.fromarray(la, "LA").convert("La")
    out = rgb_array(im.to_rgb(la_pre, BG))
    assert out[0, 0].tolist() == [40] * 3 and out[0, 1].tolist() == list(BG)


def test_palette_with_and_without_transparency():
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1, 2, 1]], np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    plain = rgb_array(im.to_rgb(Image.open(io.BytesIO(png_bytes(p))), BG))
    assert plain[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 0]]
    # index 1 transparent (PNG tRNS) → background
    loaded = im.load_image(png_bytes(p, transparency=1))
    assert loaded.mode == "P" and "transparency" in loaded.info
    out = rgb_array(im.to_rgb(loaded, BG))
    assert out[0].tolist() == [[255, 0, 0], list(BG), [0, 0, 255], list(BG)]


def test_grey_one_bit_and_grey_with_transparency():
    grey = np.array([[0, 17, 128, 255]], np.uint8)
    out = rgb_array(im.to_rgb(Image.fromarray(grey, "L"), BG))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
    bits = Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8), "L").convert("1")
    assert rgb_array(im.to_rgb(bits, BG))[0, :, 0].tolist() == [0, 255, 255, 0]
    loaded = im.load_image(png_bytes(Image.fromarray(grey, "L"), transparency=17))
    out = rgb_array(im.to_rgb(loaded, BG))
    assert out[0, 1].tolist() == list(BG) and out[0, 2].tolist() == [128] * 3


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_is_scaled_not_clipped(mode):
    v16 = np.array([[0, 257, 32768, 65535, 1000]], np.uint16)
    img = Image.fromarray(v16) if mode == "I;16" else Image.fromarray(v16.astype(np.int32), "I")
    if mode == "I;16":  # through a real 16-bit PNG
        img = im.load_image(png_bytes(img))
        assert img.mode.startswith("I")
    out = rgb_array(im.to_rgb(img, BG))
    expected = np.floor(v16.astype(float) * 255 / 65535 + 0.5).astype(np.int64)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[0, 2, 0] == 128 and out[0, 3, 0] == 255  # PIL's own convert would give 255 for both


def test_cmyk_uses_the_multiplicative_formula():
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [128, 64, 0, 128], [10, 20, 30, 40]]], np.uint8)
    img = Image.frombytes("CMYK", (5, 1), cmyk.tobytes())
    buf = io.BytesIO()
    img.save(buf, format="TIFF")  # lossless round trip through a real CMYK file
    out = rgb_array(im.to_rgb(im.load_image(buf.getvalue()), BG))
    c = cmyk.astype(float)
    expected = np.floor((255 - c[..., :3]) * (255 - c[..., 3:]) / 255 + 0.5).astype(np.int64)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 2].tolist() == [0, 0, 0]


def test_ycbcr_round_trip():
    rgb = np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    out = rgb_array(im.to_rgb(Image.fromarray(rgb).convert("YCbCr"), BG))
    assert np.abs(out - rgb).max() <= 3  # JPEG's 8-bit YCbCr quantisation


@pytest.mark.parametrize("orientation, rotate", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                 (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                                 (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(orientation, rotate):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[274] = orientation
    loaded = im.load_image(png_bytes(img, exif=exif))
    out = rgb_array(im.to_rgb(loaded, BG))
    np.testing.assert_array_equal(out, rotate(stored))


def test_to_rgb_rejects_bad_background():
    with pytest.raises(ValueError, match="background"):
        im.to_rgb(Image.new("RGB", (2, 2)), (300, 0, 0))


# ------------------------------------------------------------------------------------------------
# Geometry of the official processor
# ------------------------------------------------------------------------------------------------
def test_background_colours_of_the_releases():
    assert im.background_color(CLIP_MEAN) == (122, 116, 104)
    assert im.background_color(SIGLIP_MEAN) == (127, 127, 127)
    assert im.processor_background(deepseek_vl_1p3b()) == (127, 127, 127)
    assert im.processor_background(tiny(hybrid=True)) == (122, 116, 104)


def test_size_rule_floors_the_short_side():
    assert im.resized_hw(544, 750, 384) == (278, 384)  # HF's round() gives 279
    assert im.resized_hw(1064, 750, 1024) == (1024, 721)
    assert im.resized_hw(2000, 1, 384) == (384, 14)  # min_size
    assert im.resized_hw(1, 1, 384) == (384, 384)
    assert im.resized_hw(10, 3, 20, min_size=1) == (20, 6)


def test_resize_and_pad_match_plain_pil():
    rng = np.random.RandomState(1)
    for w, h in [(300, 200), (200, 300), (97, 401), (384, 384), (1000, 30)]:
        img = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        nh, nw = im.resized_hw(h, w, 384)
        resized = im.resize_long_side(img, 384)
        np.testing.assert_array_equal(np.asarray(resized), np.asarray(img.resize((nw, nh), Image.BICUBIC)))
        square = np.asarray(im.expand_to_square(resized, BG))
        assert square.shape == (384, 384, 3)
        top, left = (384 - nh) // 2, (384 - nw) // 2
        np.testing.assert_array_equal(square[top:top + nh, left:left + nw], np.asarray(resized))
        mask = np.ones((384, 384), bool)
        mask[top:top + nh, left:left + nw] = False
        assert (square[mask] == BG).all()


def test_to_unit_chw_is_the_official_rescale():
    arr = np.array([[[0, 1, 255], [128, 254, 7]]], np.uint8)
    x = im.to_unit_chw(Image.fromarray(arr))
    assert x.dtype == np.float32 and x.shape == (3, 1, 2)
    np.testing.assert_array_equal(x, (arr.transpose(2, 0, 1) * 0.00392156862745098).astype(np.float32))
    assert x[2, 0, 0] == 1.0


def test_one_by_one_and_one_by_two_thousand():
    x = im.square_image(Image.new("RGB", (1, 1), (10, 200, 30)), 384, BG)
    assert x.shape == (3, 384, 384)
    np.testing.assert_array_equal(x, np.broadcast_to(im.to_unit_chw(Image.new("RGB", (1, 1), (10, 200, 30))),
                                                     (3, 384, 384)))
    tall = Image.new("RGB", (1, 2000), (250, 5, 60))  # w=1, h=2000 → 14 wide column, centred
    x = im.square_image(tall, 384, BG)
    left = (384 - 14) // 2
    col = np.array([250, 5, 60], np.float64)[:, None, None] / 255
    np.testing.assert_allclose(x[:, :, left:left + 14], np.broadcast_to(col, (3, 384, 14)), atol=1e-7)
    bg = np.array(BG, np.float64)[:, None, None] / 255
    np.testing.assert_allclose(x[:, :, :left], np.broadcast_to(bg, (3, 384, left)), atol=1e-7)
    np.testing.assert_allclose(x[:, :, left + 14:], np.broadcast_to(bg, (3, 384, 384 - left - 14)), atol=1e-7)
    wide = im.square_image(Image.new("L", (2000, 1), 77), 64, BG)  # also through the L → RGB path
    np.testing.assert_allclose(wide[:, (64 - 14) // 2, :], np.full((3, 64), 77 / 255), atol=1e-7)


def test_rgba_transparent_area_looks_like_padding():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[:, :10, 3] = 255  # left half opaque red, right half transparent
    x = im.square_image(Image.fromarray(rgba, "RGBA"), 40, BG)
    bg = np.array(BG) / 255
    np.testing.assert_allclose(x[:, 20, 35], bg, atol=1e-7)   # transparent part
    np.testing.assert_allclose(x[:, 0, 20], bg, atol=1e-7)    # padding
    np.testing.assert_allclose(x[:, 20, 5], [1, 0, 0], atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Views for the towers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src, dst", [(1024, 384), (64, 32), (100, 37), (20, 50)])
def test_antialiased_resize_matches_torch(src, dst):
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(src).rand(2, 3, src, src).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(dst, dst), mode="bilinear",
                                          align_corners=False, antialias=True).numpy()
    np.testing.assert_allclose(im.resize_bilinear_antialias(x, dst), ref, rtol=0, atol=2e-7)


def test_model_views_hybrid_and_siglip_only():
    torch = pytest.importorskip("torch")
    cfg = tiny(hybrid=True)
    x = np.random.RandomState(0).rand(2, 3, 64, 64).astype(np.float32)
    v = im.model_views(x, cfg)
    clip_mean = np.array(cfg.sam.pixel_mean, np.float32)[:, None, None]
    clip_std = np.array(cfg.sam.pixel_std, np.float32)[:, None, None]
    np.testing.assert_array_equal(v["high_res_pixel_values"], (x - clip_mean) / clip_std)
    low = torch.nn.functional.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear",
                                          align_corners=False, antialias=True).numpy()
    np.testing.assert_allclose(v["pixel_values"], (low - 0.5) / 0.5, rtol=0, atol=5e-7)
    one = im.model_views(x[0], cfg)
    assert one["pixel_values"].shape == (3, 32, 32) and one["high_res_pixel_values"].shape == (3, 64, 64)
    flat = im.model_views(x[:, :, :32, :32], tiny(hybrid=False))
    assert set(flat) == {"pixel_values"}
    np.testing.assert_array_equal(flat["pixel_values"], (x[:, :, :32, :32] - np.float32(0.5)) / np.float32(0.5))
    with pytest.raises(ValueError, match="expects"):
        im.model_views(x, tiny(hybrid=False))


# ------------------------------------------------------------------------------------------------
# Decoding and bad input
# ------------------------------------------------------------------------------------------------
def fake_png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width×height and no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_sources_path_bytes_data_uri(tmp_path):
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8))
    data = png_bytes(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (path, str(path), data, bytearray(data), uri, img, np.asarray(img)):
        np.testing.assert_array_equal(np.asarray(im.load_image(src)), np.asarray(img))
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    assert im.load_image(grey).mode == "L"
    with pytest.raises(im.ImageError, match=r"rec-3: array of shape \(3, 4, 2\)"):
        im.load_image(np.zeros((3, 4, 2), np.uint8), name="rec-3")
    with pytest.raises(im.ImageError, match="dtype float32 unsupported"):
        im.load_image(np.zeros((3, 4, 3), np.float32))


def test_multiframe_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = rgb_array(im.to_rgb(im.load_image(buf.getvalue()), BG))
    assert out[0, 0].tolist() == [255, 0, 0]


def test_missing_empty_truncated_and_non_image_files(tmp_path):
    with pytest.raises(im.ImageError, match=r"nope\.png.*not found"):
        im.load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(im.ImageError, match=r"empty\.png.*empty \(0 bytes\)"):
        im.load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 10)
    with pytest.raises(im.ImageError, match=r"notes\.png.*not a recognised image"):
        im.load_image(text)
    rng = np.random.RandomState(0)
    full = png_bytes(Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(im.ImageError, match=r"cut\.png.*cannot decode"):
        im.load_image(cut)
    jpg = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    with pytest.raises(im.ImageError, match="record-17.*cannot decode JPEG"):
        im.load_image(jpg.getvalue()[: len(jpg.getvalue()) // 2], name="record-17")
    with pytest.raises(im.ImageError, match="record-18.*cannot parse image header"):
        im.load_image(jpg.getvalue()[:300], name="record-18")
    with pytest.raises(im.ImageError, match="unsupported image source"):
        im.load_image(12345)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, we raise
def test_pixel_limit_is_checked_from_the_header(tmp_path):
    # No pixel data follows the header: reaching the limit message proves nothing was decoded first.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(fake_png_header(12_000, 12_000))  # 144 Mpx: over our default, under PIL's own error
    with pytest.raises(im.ImageError, match=r"bomb\.png.*12000x12000.*exceeds max_pixels"):
        im.load_image(bomb)
    with pytest.raises(im.ImageError, match="rec-9.*(exceeds max_pixels|too many pixels)"):
        im.load_image(fake_png_header(50_000, 50_000), name="rec-9")  # PIL's own bomb error, reworded
    small = png_bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(im.ImageError, match="10000 pixels exceeds max_pixels=5000"):
        im.load_image(small, max_pixels=5000)
    assert im.load_image(small, max_pixels=10_000).size == (100, 100)


def test_bad_data_uris():
    with pytest.raises(im.ImageError, match="expected 'data:image"):
        im.load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(im.ImageError, match="invalid base64"):
        im.load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(im.ImageError, match="not a recognised image"):
        im.load_image("data:image/png;base64," + base64.b64encode(b"hello world").decode())


def test_square_image_errors_name_the_source(tmp_path):
    with pytest.raises(im.ImageError, match=r"gone\.jpg"):
        im.square_image(tmp_path / "gone.jpg", 384, BG)
