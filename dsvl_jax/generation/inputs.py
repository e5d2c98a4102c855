"""Prompt batches → the static shapes the compiled prefill takes: checks, left packing and buckets.

Every shape the compiled programs see is rounded up to a bucket, so that prompts of nearby lengths
(and batches with a similar number of images) share one compiled prefill and one decode loop:
- prompt length: a multiple of 64 up to 512, beyond that a multiple of 1/8 of the next power of two
  (at most 12.5 % padding; 640 stays 640, 700 becomes 768);
- images: the next power of two (extra slots are zero images marked invalid; the tower encodes
  them and the splice skips them);
- new tokens: a multiple of 64 (the loop bound itself is a traced value).

Rows are re-packed to the left (real tokens last, in order), whatever padding the caller used: the
model sees positions cumsum(mask) - 1 and masks padding keys, so this changes nothing (transformers'
`generate` does the same with position_ids = cumsum(attention_mask) - 1).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dsvl_jax.config import VLMConfig
from dsvl_jax.errors import InputError

LENGTH_QUANTUM = 64
NEW_TOKENS_QUANTUM = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(n: int, quantum: int = LENGTH_QUANTUM, steps_per_octave: int = 8) -> int:
    """The padded prompt length for a longest row of `n` tokens."""
    if n < 1:
        raise ValueError(f"prompt length {n}: must be at least 1")
    step = max(quantum, (1 << max(0, (n - 1).bit_length())) // steps_per_octave)
    return round_up(n, step)


def bucket_images(n: int) -> int:
    """Padded number of image slots: 0 stays 0 (text-only program), else the next power of two."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def bucket_new_tokens(n: int, quantum: int = NEW_TOKENS_QUANTUM) -> int:
    return round_up(n, quantum)


@dataclasses.dataclass
class PackedBatch:
    """A prompt batch at bucketed shapes, left-padded (all arrays numpy)."""

    input_ids: np.ndarray  # [B, T] int32
    attention_mask: np.ndarray  # [B, T] int32
    lengths: np.ndarray  # [B] real tokens per row
    pixel_values: Optional[np.ndarray] = None  # [N_bucket, 3, s, s]
    high_res_pixel_values: Optional[np.ndarray] = None  # [N_bucket, 3, S, S]
    image_valid: Optional[np.ndarray] = None  # [N_bucket] bool
    n_images: int = 0

    @property
    def shape_key(self) -> tuple:
        n = 0 if self.pixel_values is None else self.pixel_values.shape[0]
        return self.input_ids.shape + (n,)


def check_pixels(name: str, x: np.ndarray, size: int) -> None:
    """Raise `InputError` unless x is [num_images, 3, size, size] and finite."""
    if x.ndim != 4 or x.shape[1:] != (3, size, size):
        raise InputError(f"{name} must be [num_images, 3, {size}, {size}], got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} holds NaN or Inf")


def check_views(cfg: VLMConfig, pv: np.ndarray, hv: Optional[np.ndarray]) -> None:
    """HF-port contract: pixel_values [N, 3, s, s], and for the hybrid high_res_pixel_values [N, 3, S, S]."""
    check_pixels("pixel_values", pv, cfg.siglip.image_size)
    if cfg.is_hybrid:
        if hv is None:
            raise InputError("the hybrid model needs high_res_pixel_values with pixel_values")
        check_pixels("high_res_pixel_values", hv, cfg.sam.image_size)
        if hv.shape[0] != pv.shape[0]:
            raise InputError(f"{pv.shape[0]} low-res but {hv.shape[0]} high-res images")


def check_ids(ids: np.ndarray, vocab_size: int, mask: Optional[np.ndarray] = None, name: str = "input_ids") -> None:
    """Raise `InputError` unless `ids` are integers in [0, vocab_size) (where `mask` is true, when given):
    the embedding lookup would otherwise truncate floats and clamp or wrap other ids without a word."""
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    real = ids if mask is None else ids[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        bad = int(real.min()) if real.min() < 0 else int(real.max())
        raise InputError(f"{name} hold id {bad}, outside the vocabulary [0, {vocab_size})")


def pack_batch(cfg: VLMConfig, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None,
               *, max_new_tokens: int, length_quantum: int = LENGTH_QUANTUM) -> PackedBatch:
    """Check a prompt batch (HF-port contract) and lay it out at bucketed shapes. Raises `InputError`."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InputError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    mask = mask.astype(bool)
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise InputError(f"rows {np.flatnonzero(lengths == 0).tolist()} of attention_mask have no real token")
    check_ids(ids, cfg.text.vocab_size, mask)
    context = cfg.text.max_position_embeddings
    if lengths.max() + max_new_tokens > context:
        raise InputError(f"prompt of {int(lengths.max())} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model context of {context} positions")

    # Images: counts per row (runs of num_image_tokens), total against the pixels given.
    is_img = ids == cfg.image_token_id
    if (is_img & ~mask).any():
        raise InputError(f"image tokens (id {cfg.image_token_id}) sit at padding positions (attention_mask 0)")
    per_row = is_img.sum(1)
    n_tok = cfg.num_image_tokens
    if (per_row % n_tok).any():
        row = int(np.flatnonzero(per_row % n_tok)[0])
        raise InputError(f"row {row} holds {int(per_row[row])} image tokens, not a multiple of the "
                         f"{n_tok} tokens of one image")
    n_images = int(per_row.sum()) // n_tok
    pv = None if pixel_values is None else np.asarray(pixel_values, np.float32)
    hv = None if high_res_pixel_values is None else np.asarray(high_res_pixel_values, np.float32)
    if pv is None and hv is not None:
        raise InputError("high_res_pixel_values given without pixel_values")
    if pv is not None:
        check_views(cfg, pv, hv)
        if not cfg.is_hybrid and hv is not None:
            raise InputError("high_res_pixel_values given, but the model has no high-resolution tower")
    given = 0 if pv is None else pv.shape[0]
    if given != n_images:
        raise InputError(f"{n_images} image(s) in input_ids ({int(per_row.sum())} tokens with id "
                         f"{cfg.image_token_id}, {n_tok} per image) but {given} image(s) in pixel_values")

    # Left packing at the bucketed length.
    b = ids.shape[0]
    t = bucket_length(int(lengths.max()), length_quantum)
    fill = 0 if cfg.image_token_id != 0 else 1  # masked anyway; must not look like an image token
    packed_ids = np.full((b, t), fill, np.int32)
    packed_mask = np.zeros((b, t), np.int32)
    for r in range(b):
        n = int(lengths[r])
        packed_ids[r, t - n:] = ids[r][mask[r]]
        packed_mask[r, t - n:] = 1
    out = PackedBatch(packed_ids, packed_mask, lengths.astype(np.int32), n_images=n_images)
    if n_images:
        n_slots = bucket_images(n_images)
        out.image_valid = np.arange(n_slots) < n_images
        out.pixel_values = _pad_images(pv, n_slots)
        out.high_res_pixel_values = None if hv is None else _pad_images(hv, n_slots)
    return out


def _pad_images(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[0] == n:
        return np.ascontiguousarray(x)
    pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])
