"""One request → a prepared row; prepared rows → one padded batch through `VLM.generate` (or its stream).

Shared by `dsvl-serve` (rows that arrive together) and `dsvl-eval` (rows of a data file). A row is
prepared on its own, so that one bad request (an image that does not decode, too many images, a prompt
that does not fit the context) is refused alone, with a reason, before it can spoil a batch:

    row = prepare(processor, conversation, max_new_tokens=64, max_images=4)   # raises PrepareError
    tokens = generate(vlm, [row_a, row_b], max_new_tokens=64, eos_id=tok.eos_id, pad_to=4)

The batch is what `Processor` would build for the same conversations (left-padded ids, the images of
all rows in row order), so a row's greedy tokens are those of the row run alone: `VLM.generate`
re-packs rows to the left and masks padding. `pad_to` repeats the last row up to a fixed batch size,
so that batches of different sizes share one compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from dsvl_jax.processing.chat import conversation_images, format_prompt
from dsvl_jax.processing.image import ImageError, model_views


class PrepareError(ValueError):
    """A request that cannot become a row; `code` says which kind (OpenAI-style error codes)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Prepared:
    """One prompt, ready to batch: its real tokens and its images' model views."""

    input_ids: np.ndarray  # [T] int32, BOS first, image tokens expanded
    pixel_values: Optional[np.ndarray]  # [n, 3, s, s] or None without images
    high_res_pixel_values: Optional[np.ndarray]  # [n, 3, S, S] for the hybrid, else None

    @property
    def n_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def default_max_images(config) -> int:
    """As many images as the context can hold at all (each takes `num_image_tokens` positions)."""
    return max(1, config.text.max_position_embeddings // config.num_image_tokens)


def prepare(processor, conversation: Sequence[Mapping], *, max_new_tokens: int, max_images: int,
            system_prompt: Optional[str] = None) -> Prepared:
    """A conversation (official format, images in the messages' "images" lists, ending with an empty
    assistant turn) → `Prepared`. Raises `PrepareError` with code too_many_images, image_error,
    context_length_exceeded or invalid_prompt."""
    try:
        images = conversation_images(conversation)
        text = format_prompt(conversation, system_prompt=processor.system_prompt if system_prompt is None
                             else system_prompt)
    except (TypeError, ValueError) as e:
        raise PrepareError(str(e), "invalid_prompt") from None
    if len(images) > max_images:
        raise PrepareError(f"{len(images)} images; this server takes at most {max_images} per request",
                           "too_many_images")
    try:
        ids = processor.encode_prompt(text, len(images))
    except ValueError as e:
        raise PrepareError(str(e), "invalid_prompt") from None
    context = processor.config.text.max_position_embeddings
    if len(ids) + max_new_tokens > context:
        raise PrepareError(f"the prompt has {len(ids)} tokens ({len(images)} image(s) × "
                           f"{processor.num_image_tokens}); with max_tokens={max_new_tokens} that exceeds the "
                           f"model context of {context} positions", "context_length_exceeded")
    units = []
    for j, source in enumerate(images):
        try:
            units.append(processor.unit_image(source, name=f"image {j}"))
        except ImageError as e:
            raise PrepareError(str(e), "image_error") from None
    views = model_views(np.stack(units), processor.config) if units else {}
    return Prepared(np.asarray(ids, np.int32), views.get("pixel_values"), views.get("high_res_pixel_values"))


def stack(rows: Sequence[Prepared], pad_id: int, pad_to: Optional[int] = None) -> dict:
    """Rows → the HF-port batch: input_ids / attention_mask [B, T] left-padded with `pad_id`, and the
    images of all rows in row order. With `pad_to`, the last row is repeated up to that many rows."""
    if not rows:
        raise ValueError("stack needs at least one row")
    rows = list(rows)
    if pad_to is not None:
        if pad_to < len(rows):
            raise ValueError(f"pad_to={pad_to} is less than the {len(rows)} rows")
        rows += [rows[-1]] * (pad_to - len(rows))
    length = max(r.prompt_tokens for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - r.prompt_tokens:] = r.input_ids
        mask[i, length - r.prompt_tokens:] = 1
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": None, "high_res_pixel_values": None}
    with_images = [r for r in rows if r.n_images]
    if with_images:
        out["pixel_values"] = np.concatenate([r.pixel_values for r in with_images])
        if with_images[0].high_res_pixel_values is not None:
            out["high_res_pixel_values"] = np.concatenate([r.high_res_pixel_values for r in with_images])
    return out


def _generate_kw(batch: dict, *, max_new_tokens: int, eos_id: int, temperature: float, top_p, seed) -> dict:
    sample = temperature > 0
    kw = dict(pixel_values=batch["pixel_values"], high_res_pixel_values=batch["high_res_pixel_values"],
              attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens, eos_token_id=eos_id,
              pad_token_id=eos_id, do_sample=sample, temperature=temperature if sample else 1.0,
              top_p=top_p if sample else None)
    if sample:
        kw["rng"] = int(np.random.default_rng().integers(2 ** 31)) if seed is None else int(seed)
    return kw


def generate(vlm, rows: Sequence[Prepared], *, max_new_tokens: int, eos_id: int, pad_to: Optional[int] = None,
             temperature: float = 0.0, top_p: Optional[float] = None, seed: Optional[int] = None) -> np.ndarray:
    """New tokens [len(rows), steps] (after a row's EOS: EOS again). temperature 0 is greedy; otherwise
    sampling from `seed` (a fresh one when None)."""
    batch = stack(rows, eos_id, pad_to)
    kw = _generate_kw(batch, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, top_p=top_p,
                      seed=seed)
    return np.asarray(vlm.generate(batch["input_ids"], **kw))[:len(rows)]


def stream(vlm, rows: Sequence[Prepared], *, max_new_tokens: int, eos_id: int, pad_to: Optional[int] = None,
           temperature: float = 0.0, top_p: Optional[float] = None, seed: Optional[int] = None
           ) -> Iterator[np.ndarray]:
    """The same tokens as `generate`, one step [len(rows)] at a time, as soon as each step exists."""
    batch = stack(rows, eos_id, pad_to)
    kw = _generate_kw(batch, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, top_p=top_p,
                      seed=seed)
    for step in vlm.generator.stream(batch["input_ids"], **kw):
        yield np.asarray(step)[:len(rows)]


def until_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """The answer's ids: everything before the first EOS."""
    ids = [int(t) for t in tokens]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
