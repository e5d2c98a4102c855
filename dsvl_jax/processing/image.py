"""Image input: decode safely, convert any PIL mode to RGB, and reproduce the official preprocessing.

The official chain (`VLMImageProcessor`, reference doc §2.4) is: RGB → long side to `S` with
bicubic (PIL, through torchvision) using **floor** for the short side → centred paste on an `S×S`
canvas of `int(255·mean)` → HWC uint8 → CHW float32 × 1/255. No normalisation happens there: the
towers normalise (§1.4), and for the 7B the SigLIP view is made inside the model by
`torchvision.transforms.Resize(384, antialias=True)` (bilinear, antialiased) of the un-normalised
1024 tensor. `model_views` reproduces that in numpy (float32 result).

Intended differences, all measured by `tests/test_processing_hf_parity.py`:

* Size rule. The official processor floors the short side (`int(h / L * S)`); the HF port
  (`DeepseekVL*ImageProcessorPil.resize`) rounds (`round(h * S / L)`). They disagree for about half
  of real aspect ratios (750×544 → 278 vs 279 rows at 384; 4 of the 7 official example images at
  384, 3 at 1024). We follow the official rule. Where the rules agree the tensors are identical
  (0 difference); where they disagree the HF image is one row/column taller and shifted, and on
  the example images the difference reaches 0.73 in [0,1] units at the image border (mean 0.004–
  0.010). With only its size rule swapped for floor, the HF processor reproduces ours bit for bit.
* Low-res view of the 7B. The HF port resizes the padded uint8 1024 square with PIL BILINEAR
  (its converter sets `resample=BILINEAR`): the same triangle filter, but PIL rounds to uint8
  after each of its two passes. The official tower (and this module) resizes the float [0,1]
  tensor. Measured on the example images: max |Δ| = 1/255 (3.9e-3) in [0,1] units, mean ≤ 8e-4
  (twice that after SigLIP's (x−0.5)/0.5). Our view matches `torch.nn.functional.interpolate(...,
  mode="bilinear", antialias=True)`, which torchvision's tensor `Resize` calls, within 2e-7: the
  filter weights copy PyTorch's float32 arithmetic (float64 weights would be off by up to 7e-6).
  The official inference casts the [0,1] tensor to bf16 before that resize (torchvision resizes
  it in float32 and casts back); we stay in float32 and leave dtype to the model.
* Alpha. The official loader calls `convert("RGB")`, which drops alpha (the colour under
  transparent pixels shows); the HF PIL processor rejects RGBA. `to_rgb` composites on the
  processor's background colour, so transparent areas look like the padding.
* EXIF orientation is applied (neither reference does); 16-bit greyscale is scaled 65535 → 255
  (PIL's `convert("RGB")`, hence the official loader, clips it to 255: mid-grey becomes white).
  CMYK goes through PIL, whose conversion is (255−C)(255−K)/255 rounded (tested against that
  formula); embedded ICC profiles are ignored, as by both references.

Everything here is numpy + PIL only (no jax, no torch), so the Grain workers can import it.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Same figure as PIL's own warning threshold (2**30 bytes / 4 bytes / 3); ours is an error, and it is
# checked from the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
RESCALE_FACTOR = 1.0 / 255.0  # the official processor's `rescale_factor` (0.00392156862745098)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")


class ImageError(ValueError):
    """An image that cannot be used; the message names its source (file path or record id)."""


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------
def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return f"data URI ({len(text)} chars)" if text.startswith("data:") else repr(text)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _data_uri_bytes(uri: str, label: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError(f"{label}: expected 'data:image/<type>;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{label}: invalid base64 payload ({e})") from None


def load_image(source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` (path, bytes, `data:image/...;base64,` string, PIL image, or a decoded uint8
    HxW[x3|x4] numpy array as TFDS gives) fully into memory.

    The pixel count is checked from the header before decoding (decompression bombs); zero-byte,
    truncated and non-image inputs raise `ImageError` naming `name` (default: the path, or a short
    description of the bytes). Multi-frame files give their first frame. The mode is left as stored:
    `to_rgb` converts.
    """
    label = name if name is not None else _describe(source)
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, label)
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.startswith("data:"):
            data = _data_uri_bytes(text, label)
        else:
            try:
                with open(text, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise ImageError(f"{label}: file not found") from None
            except OSError as e:
                raise ImageError(f"{label}: cannot read file ({e.strerror or e})") from None
    else:
        raise ImageError(f"{label}: unsupported image source type {type(source).__name__} "
                         "(expected a path, bytes, a data URI, a PIL image or a numpy array)")
    if not data:
        raise ImageError(f"{label}: empty (0 bytes)")
    # (PIL may still warn above its own MAX_IMAGE_PIXELS; silencing that would need warnings
    # filters, which are process-global and not thread-safe, so the warning is left alone.)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a recognised image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{label}: too many pixels ({e})") from None
    except Exception as e:  # PIL raises assorted types on corrupt headers
        raise ImageError(f"{label}: cannot parse image header ({type(e).__name__}: {e})") from None
    _check_size(img.size, max_pixels, label)
    try:
        img.load()
    except Exception as e:  # truncated data raises OSError, broken chunks SyntaxError/ValueError
        raise ImageError(f"{label}: cannot decode {img.format or 'image'} data "
                         f"({type(e).__name__}: {e})") from None
    return img


def _from_array(arr: np.ndarray, max_pixels: int, label: str) -> Image.Image:
    """A decoded HxW / HxWx{1,3,4} array (e.g. a TFDS `Image` feature): uint8, or uint16 grey."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageError(f"{label}: array of shape {arr.shape} is not an image (expected HxW or HxWx{{1,3,4}})")
    if arr.dtype != np.uint8 and not (arr.dtype == np.uint16 and arr.ndim == 2):
        raise ImageError(f"{label}: array dtype {arr.dtype} unsupported (expected uint8, or uint16 grey)")
    _check_size((arr.shape[1], arr.shape[0]), max_pixels, label)
    return Image.fromarray(np.ascontiguousarray(arr))


def _check_size(size, max_pixels: int, label: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{label}: degenerate size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                         "(possible decompression bomb)")


# ------------------------------------------------------------------------------------------------
# Mode conversion
# ------------------------------------------------------------------------------------------------
def _check_background(background) -> tuple[int, int, int]:
    bg = tuple(int(c) for c in background)
    if len(bg) != 3 or any(not 0 <= c <= 255 for c in bg):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    return bg


def _composite(rgba: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    """Straight-alpha RGBA uint8 over an opaque colour, rounded to nearest (integer arithmetic)."""
    a = rgba[..., 3:4].astype(np.uint32)
    fg = rgba[..., :3].astype(np.uint32)
    back = np.asarray(bg, np.uint32)
    return ((fg * a + back * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(img: Image.Image, background, *, name: str | None = None) -> Image.Image:
    """Any PIL image → an 8-bit RGB image, upright per its EXIF orientation.

    Transparency (RGBA, LA, PA, premultiplied modes, palette or grey/RGB `transparency` entries) is
    composited on `background`; palette, 1-bit and grey modes expand to RGB; 16-bit grey is scaled
    to 8 bits (v·255/65535, rounded); CMYK, YCbCr, HSV and LAB go through PIL.
    """
    label = name if name is not None else "image"
    bg = _check_background(background)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block should not hide the pixels
        warnings.warn(f"{label}: ignoring unreadable EXIF orientation ({e})")
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        v = np.asarray(img).astype(np.int64)
        v8 = (np.clip(v, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(v8.astype(np.uint8), "L").convert("RGB")
    if mode == "F":  # float pixels: PIL's convention (0..255), clipped and rounded
        v = np.clip(np.rint(np.asarray(img, np.float64)), 0, 255)
        return Image.fromarray(v.astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info)
    if has_alpha:
        if mode in ("RGBa", "La"):  # premultiplied: PIL only converts these to their straight form
            img = img.convert(mode.upper())
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(_composite(rgba, bg), "RGB")
    if mode in ("P", "1", "L") or mode in _PLAIN_MODES:
        try:
            out = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"{label}: cannot convert mode {mode!r} to RGB ({e})") from None
        return out
    raise ImageError(f"{label}: unsupported image mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# The official geometry: long side to S (floor), bicubic, centred pad
# ------------------------------------------------------------------------------------------------
def resized_hw(height: int, width: int, size: int, min_size: int = 14) -> tuple[int, int]:
    """(h, w) after the official long-side rule; the expression order is the official one."""
    long_side = max(height, width)
    return (max(int(height / long_side * size), min_size), max(int(width / long_side * size), min_size))


def resize_long_side(img: Image.Image, size: int, min_size: int = 14) -> Image.Image:
    """Long side to `size`, short side floored (not below `min_size`), PIL bicubic (antialiased)."""
    w, h = img.size
    new_h, new_w = resized_hw(h, w, size, min_size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def expand_to_square(img: Image.Image, background) -> Image.Image:
    """Centre on a square canvas of side max(w, h) filled with `background` (official expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), _check_background(background))
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def background_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """int(255·mean) per channel: 7B (CLIP mean) → (122, 116, 104), 1.3B (0.5) → (127, 127, 127)."""
    return tuple(int(m * 255) for m in mean)


def processor_background(cfg) -> tuple[int, int, int]:
    """The padding colour of the released processor for a model: the 7B pads with the CLIP mean (its
    processor's `image_mean`), the 1.3B with 0.5."""
    return background_color(cfg.sam.pixel_mean if cfg.is_hybrid else cfg.siglip.pixel_mean)


def to_unit_chw(img: Image.Image) -> np.ndarray:
    """RGB PIL image → float32 [3, H, W] in [0, 1], as the official rescale (uint8 × 1/255 in float64)."""
    if img.mode != "RGB":
        raise ValueError(f"to_unit_chw expects an RGB image, got mode {img.mode!r} (use to_rgb first)")
    hwc = np.asarray(img, dtype=np.uint8)
    return (hwc.transpose(2, 0, 1).astype(np.float64) * RESCALE_FACTOR).astype(np.float32)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x − mean) / std per channel on axis −3, in float32 (as torchvision's Normalize and HF's)."""
    x = np.asarray(x, np.float32)
    shape = (3, 1, 1)
    m = np.asarray(mean, np.float32).reshape(shape)
    s = np.asarray(std, np.float32).reshape(shape)
    return (x - m) / s


def square_image(source_or_img, size: int, background, *, min_size: int = 14, name: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The whole official processor for one image: float32 [3, size, size] in [0, 1]."""
    img = load_image(source_or_img, name=name, max_pixels=max_pixels)
    label = name if name is not None else _describe(source_or_img)
    rgb = to_rgb(img, background, name=label)
    square = expand_to_square(resize_long_side(rgb, size, min_size), background)
    return to_unit_chw(square)


# ------------------------------------------------------------------------------------------------
# Views the towers take
# ------------------------------------------------------------------------------------------------
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [out, K] of the antialiased triangle (bilinear) filter.

    The window and normalisation are PIL's BILINEAR and PyTorch's `interpolate(mode="bilinear",
    antialias=True)`: support grows with the downscale factor, taps sum to one. The arithmetic
    mirrors PyTorch's float32 kernel step by step (float32 scale/centre/weights, the few steps that
    C++ promotes to double done in float64), because the official model resizes a float32 tensor
    and float64 weights would differ from it by up to 7e-6.
    """
    f32, f64 = np.float32, np.float64
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    inv = f32(1.0 / f64(scale)) if scale >= 1.0 else f32(1.0)
    center = (f64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    lo = np.maximum(np.trunc((center - support).astype(f64) + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc((center + support).astype(f64) + 0.5).astype(np.int64), in_size)
    k = int((hi - lo).max())
    pos = lo[:, None] + np.arange(k)[None, :]
    x = np.abs((((pos.astype(f32) - center[:, None]).astype(f64) + 0.5) * f64(inv)).astype(f32))
    w = np.where(x < 1.0, (1.0 - x.astype(f64)).astype(f32), f32(0.0))
    w = np.where(pos < hi[:, None], w, f32(0.0)).astype(f32)
    total = np.zeros(out_size, f32)
    for j in range(k):  # float32 running sum in tap order, as the kernel
        total = (total + w[:, j]).astype(f32)
    safe = np.where(total != 0.0, total, f32(1.0)).astype(f32)
    w = (w / safe[:, None]).astype(f32)
    return np.minimum(pos, in_size - 1), w.astype(f64)  # padding taps: a valid index, weight 0


def antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The same filter as a dense [out, in] float32 matrix (for resizing inside a jitted model)."""
    idx, wts = _aa_taps(in_size, out_size)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), idx.shape[1]), idx.reshape(-1)), wts.reshape(-1))
    return m.astype(np.float32)


def _resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    idx, wts = _aa_taps(x.shape[axis], out_size)
    out = None
    for k in range(idx.shape[1]):
        shape = [1] * x.ndim
        shape[axis] = out_size
        term = np.take(x, idx[:, k], axis=axis) * wts[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def resize_bilinear_antialias(x: np.ndarray, size: int) -> np.ndarray:
    """[..., H, W] → [..., size, size] float32, antialiased bilinear (torchvision tensor `Resize`)."""
    x64 = np.asarray(x, np.float64)
    if x64.shape[-2:] == (size, size):
        return x64.astype(np.float32)
    y = _resample_axis(x64, x64.ndim - 1, size)  # width first, then height, as PyTorch
    y = _resample_axis(y, x64.ndim - 2, size)
    return y.astype(np.float32)


def model_views(x01: np.ndarray, cfg) -> dict:
    """[…, 3, S, S] in [0, 1] → the HF-port inputs of `DeepseekVL(Hybrid)ForConditionalGeneration`.

    Hybrid: `high_res_pixel_values` = CLIP-normalised S×S (SAM input) and `pixel_values` = the
    antialiased-bilinear resize to the SigLIP size, SigLIP-normalised (official HybridVisionTower).
    SigLIP only: `pixel_values` = SigLIP-normalised S×S.
    """
    x01 = np.asarray(x01, np.float32)
    if x01.shape[-3] != 3 or x01.shape[-1] != x01.shape[-2] or x01.shape[-1] != cfg.image_size:
        raise ValueError(f"model_views expects [..., 3, {cfg.image_size}, {cfg.image_size}], got {x01.shape}")
    if not cfg.is_hybrid:
        return {"pixel_values": normalize(x01, cfg.siglip.pixel_mean, cfg.siglip.pixel_std)}
    low = resize_bilinear_antialias(x01, cfg.siglip.image_size)
    return {
        "pixel_values": normalize(low, cfg.siglip.pixel_mean, cfg.siglip.pixel_std),
        "high_res_pixel_values": normalize(x01, cfg.sam.pixel_mean, cfg.sam.pixel_std),
    }
