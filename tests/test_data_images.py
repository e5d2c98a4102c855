"""Unusual but valid images come out of the whole pipeline as the right RGB views (expected pixels)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dsvl_jax import config as C
from dsvl_jax.data import loader as L
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.processing import image as image_lib

CFG = C.tiny()  # hybrid: the square is 64 px (SAM view), the SigLIP view 32 px
S = CFG.image_size
BG = (122, 116, 104)  # int(255 * CLIP mean): the 7B processor's padding colour


def _save(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _canvas(w, h, fill):
    """Expected square for a uniform w x h image of RGB `fill`: official long-side rule, centred on BG."""
    long_side = max(w, h)
    nh, nw = max(int(h / long_side * S), 14), max(int(w / long_side * S), 14)
    out = np.empty((S, S, 3), np.uint8)
    out[:] = BG
    top, left = (S - nh) // 2, (S - nw) // 2
    out[top:top + nh, left:left + nw] = fill
    return out


def _exif_rotated():
    # stored 40x20: top half red, bottom half blue; EXIF orientation 6 = display rotated 90° clockwise
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, exif=exif)


def _cases():
    a = 128
    rgba_fill = tuple((np.array([255, 0, 0]) * a + np.array(BG) * (255 - a) + 127) // 255)
    cmyk = np.array([10, 200, 30, 50])
    cmyk_fill = tuple(((255 - cmyk[:3]) * (255 - cmyk[3]) + 127) // 255)
    v16 = 40000
    palette = Image.new("P", (25, 5), 3)
    palette.putpalette([0, 0, 0] * 3 + [12, 34, 56] + [0, 0, 0] * 252)
    return {
        "rgba": (_save(Image.new("RGBA", (10, 20), (255, 0, 0, a))), _canvas(10, 20, rgba_fill)),
        "gray16": (_save(Image.fromarray(np.full((30, 30), v16, np.uint16))),
                   _canvas(30, 30, (v16 * 255 + 32767) // 65535)),
        "cmyk": (_save(Image.new("CMYK", (12, 8), tuple(int(c) for c in cmyk)), "TIFF"), _canvas(12, 8, cmyk_fill)),
        "palette": (_save(palette), _canvas(25, 5, (12, 34, 56))),
        "gray": (_save(Image.new("L", (7, 9), 77)), _canvas(7, 9, 77)),
        # 1x1 scales up to the whole square (no padding); 1x2000 becomes a 14-px wide (min_size) column
        "one_pixel": (_save(Image.new("RGB", (1, 1), (9, 99, 199))), _canvas(1, 1, (9, 99, 199))),
        "one_by_2000": (_save(Image.new("RGB", (1, 2000), (200, 10, 60))), _canvas(1, 2000, (200, 10, 60))),
        "exif_rotated": (_exif_rotated(), None),
    }


def _high_res(canvas: np.ndarray) -> np.ndarray:
    x01 = (canvas.transpose(2, 0, 1).astype(np.float64) / 255.0).astype(np.float32)
    mean = np.asarray(CFG.sam.pixel_mean, np.float32)[:, None, None]
    std = np.asarray(CFG.sam.pixel_std, np.float32)[:, None, None]
    return (x01 - mean) / std


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("unusual")
    tok = synthetic.corpus_tokenizer(str(d / "tok"))
    cases = _cases()
    recs = [R.Record(name, "unusual", "caption", (R.image(0), R.text("a photo")), (blob,))
            for name, (blob, _) in cases.items()]
    R.write_records(str(d / "img"), recs)
    dc = L.DataConfig(sources=(SourceConfig("unusual", str(d / "img-*")),), pack=False, num_epochs=1,
                      max_images_per_row=1)
    it = L.make_train_iterator(dc, CFG, tok, batch_size=1, seq_len=32, seed=0, process_index=0, process_count=1)
    out = [next(it) for _ in range(len(recs))]
    with pytest.raises(StopIteration):
        next(it)
    assert it.stats().total_skipped == 0
    return cases, out


def _row_for(rows, expected_high):
    hits = [r for r in rows if np.allclose(r["high_res_pixel_values"][0, 0], expected_high, atol=1e-6)]
    assert len(hits) == 1, f"{len(hits)} rows match"
    return hits[0]


@pytest.mark.parametrize("name", ["rgba", "gray16", "cmyk", "palette", "gray", "one_pixel", "one_by_2000"])
def test_unusual_image_views(rows, name):
    cases, out = rows
    canvas = cases[name][1]
    row = _row_for(out, _high_res(canvas))
    assert row["image_mask"].tolist() == [[True]]
    np.testing.assert_allclose(row["high_res_pixel_values"][0, 0], _high_res(canvas), atol=1e-6)
    # the SigLIP view: the processor's antialiased resize of exactly this canvas
    x01 = (canvas.transpose(2, 0, 1).astype(np.float64) / 255.0).astype(np.float32)
    np.testing.assert_array_equal(row["pixel_values"][0, 0], image_lib.model_views(x01, CFG)["pixel_values"])
    assert np.isfinite(row["pixel_values"]).all() and np.isfinite(row["high_res_pixel_values"]).all()


def test_exif_rotation_is_applied(rows):
    _, out = rows
    # displayed 20 wide x 40 tall: left half blue, right half red; scaled to 32 x 64, centred at x 16..47
    blue = _high_res(np.broadcast_to(np.array([0, 0, 255], np.uint8), (S, S, 3)))[:, 0, 0]
    red = _high_res(np.broadcast_to(np.array([255, 0, 0], np.uint8), (S, S, 3)))[:, 0, 0]
    bg = _high_res(np.broadcast_to(np.array(BG, np.uint8), (S, S, 3)))[:, 0, 0]
    candidates = [r["high_res_pixel_values"][0, 0] for r in out]
    hits = [x for x in candidates if np.allclose(x[:, :, 20], blue[:, None], atol=1e-6)
            and np.allclose(x[:, :, 44], red[:, None], atol=1e-6)]
    assert len(hits) == 1
    x = hits[0]
    np.testing.assert_allclose(x[:, :, :16], np.broadcast_to(bg[:, None, None], (3, S, 16)), atol=1e-6)
    np.testing.assert_allclose(x[:, :, 48:], np.broadcast_to(bg[:, None, None], (3, S, 16)), atol=1e-6)
    np.testing.assert_allclose(x[:, :, 16:26], np.broadcast_to(blue[:, None, None], (3, S, 10)), atol=1e-6)
    np.testing.assert_allclose(x[:, :, 38:48], np.broadcast_to(red[:, None, None], (3, S, 10)), atol=1e-6)
