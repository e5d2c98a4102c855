"""Per-example transforms: serialised record -> token ids, supervision flags and model image views.

Everything model-specific is the processor's own code (`dsvl_jax.processing`): image decoding, RGB
conversion, pad-to-square, resize and normalisation (`square_image`, `model_views`), the chat
template (`render_segments`), tokenisation (`Tokenizer.encode_segments`) and the image-token
expansion (`expand_image_tokens`). This module only decides what is supervised:

- documents (text, captions, interleaved): BOS + text with one placeholder per image + EOS; every
  text token and the EOS are supervised;
- conversations: the chat template; only the assistant answers and their EOS are supervised.

Image tokens are never supervised. A record that cannot be used becomes a *skip marker*
`{"skip": reason, ...}` instead of an example, so that worker processes never raise and the main
process counts it (`packing.DataStats`). Checks that guard against silently wrong examples: the
image-token count after tokenisation must equal the number of images (a literal placeholder in
the text is caught here), and pixel values must be finite. The `Processor` built here checks once
that tokenizer and model agree (image id, vocabulary size).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..processing import chat
from ..processing import image as image_lib
from ..processing.processor import Processor, expand_image_tokens
from . import records as R

# Task tags the build tool writes, plus the paper's Table 1/2 categories. Index 0 is padding.
DEFAULT_TASKS = ("text", "caption", "interleaved", "sft", "table_chart", "web_code", "scene_ocr", "doc_ocr")


def image_error_reason(err: Exception) -> str:
    """A countable reason for an `ImageError` (its message says what went wrong)."""
    msg = str(err)
    if "file not found" in msg:
        return "missing image file"
    if "empty (0 bytes)" in msg:
        return "empty image bytes"
    if "max_pixels" in msg or "too many pixels" in msg or "degenerate size" in msg:
        return "image too large"
    return "undecodable image"


def task_tag_prefix(task: str) -> str:
    """The task tag put in front of an instruction when task-tag prompting is on (paper §3.1's task
    taxonomy as a prompt): "[chart] " before "How high is the C bar?"."""
    return f"[{task}] "


def to_conversation(rec: R.Record, task_tag: bool = False) -> tuple[list[dict], str]:
    """A conversation record -> (chat messages for `chat.render_segments`, system prompt).

    Consecutive segments of one role form a turn; an image belongs to the turn of the text after it
    (or before it, at the very end) and appears as `chat.IMAGE_TAG` at its place in that turn.
    Leading system segments replace the default system prompt. Raises ValueError if the record is
    not a well-formed conversation (the template itself checks that turns alternate).
    `task_tag`: the first user turn starts with `task_tag_prefix(rec.task)`.
    """
    segs = list(rec.segments)
    roles: list[str | None] = [None if s.is_image else s.role for s in segs]
    following = None
    for i in range(len(segs) - 1, -1, -1):  # images take the role of the next text
        if roles[i] is None:
            roles[i] = following
        following = roles[i]
    preceding = None
    for i in range(len(segs)):  # ...or of the previous text when none follows
        if roles[i] is None:
            roles[i] = preceding
        preceding = roles[i]
    system, messages = [], []
    for seg, role in zip(segs, roles):
        if role == "system":
            if messages or seg.is_image:
                raise ValueError("system text (without images) may only open a conversation")
            system.append(seg.text)
            continue
        piece = chat.IMAGE_TAG if seg.is_image else seg.text
        name = chat.USER if role == "user" else chat.ASSISTANT
        if messages and messages[-1]["role"] == name:
            messages[-1]["content"] += piece
        else:
            messages.append({"role": name, "content": piece})
    system_prompt = "".join(system).strip() if system else chat.SYSTEM_PROMPT
    if task_tag:
        first_user = next((m for m in messages if m["role"] == chat.USER), None)
        if first_user is not None:
            first_user["content"] = task_tag_prefix(rec.task) + first_user["content"]
    return messages, system_prompt


@dataclasses.dataclass
class ExampleMaker:
    """Callable: {"raw": bytes, "source": name, "code": int} -> example dict or skip marker.

    The example dict (consumed by `packing`):
      ids int32 [L], supervised bool [L] (token is a supervised *target*), image_starts int32 [n],
      pixel_values float32 [n,3,S_lo,S_lo], high_res_pixel_values float32 [n,3,S_hi,S_hi] (hybrid),
      task_id int (1-based index into `tasks`), code int, splittable bool, source str, record_id str.
    """

    tokenizer: Any
    model_config: Any
    tasks: Sequence[str] = DEFAULT_TASKS
    max_pixels: int = image_lib.DEFAULT_MAX_PIXELS
    task_tag_prompt: bool = False  # put the record's task tag in front of its first instruction

    def __post_init__(self):
        # The processor checks that tokenizer and model agree (image id, vocabulary size).
        self.processor = Processor(self.tokenizer, self.model_config, max_pixels=self.max_pixels)
        self.tasks = tuple(self.tasks)
        self._task_ids = {t: i + 1 for i, t in enumerate(self.tasks)}

    def task_vocabulary(self) -> tuple[str, ...]:
        """Names of the task ids: index 0 is padding."""
        return ("<pad>",) + self.tasks

    def __call__(self, item: dict) -> dict:
        meta = {"source": item.get("source", ""), "code": int(item.get("code", -1)), "record_id": ""}
        try:
            rec = R.deserialize(item["raw"])
            meta["record_id"] = rec.record_id
            return {**self.make(rec), **meta}
        except R.RecordError as e:
            return {"skip": e.reason, "detail": e.detail, **meta}
        except Exception as e:  # a worker must never die on one record; the counter shows it
            return {"skip": f"unexpected {type(e).__name__}", "detail": str(e), **meta}

    # -- pieces -------------------------------------------------------------------------------
    def make(self, rec: R.Record) -> dict:
        task_id = self._task_ids.get(rec.task)
        if task_id is None:
            raise R.RecordError("unknown task tag", f"{rec.task!r} is not one of {self.tasks}")
        ids, supervised = self.tokens(rec)
        views = self.images(rec)
        n_tok = self.model_config.num_image_tokens
        first = np.flatnonzero(ids == self.model_config.image_token_id)  # one placeholder per image
        expanded = np.asarray(expand_image_tokens(ids.tolist(), self.model_config.image_token_id, n_tok), np.int32)
        repeats = np.where(ids == self.model_config.image_token_id, n_tok, 1)
        supervised = np.repeat(supervised, repeats)
        if len(expanded) != len(supervised):  # guards the masks against a change in the expansion rule
            raise AssertionError(f"expand_image_tokens gave {len(expanded)} ids for {len(supervised)}")
        example = {
            "ids": expanded,
            "supervised": supervised,
            "image_starts": (first + np.arange(len(first)) * (n_tok - 1)).astype(np.int32),
            "task_id": task_id,
            "splittable": not rec.is_conversation,
            "pixel_values": views["pixel_values"],
        }
        if "high_res_pixel_values" in views:
            example["high_res_pixel_values"] = views["high_res_pixel_values"]
        return example

    def tokens(self, rec: R.Record) -> tuple[np.ndarray, np.ndarray]:
        """Ids with one placeholder per image, and which of them are supervised targets."""
        tok = self.tokenizer
        if rec.is_conversation:
            try:
                messages, system = to_conversation(rec, self.task_tag_prompt)
                segments = chat.render_segments(messages, system_prompt=system)
            except ValueError as e:
                raise R.RecordError("malformed conversation", str(e)) from None
            ids, roles = tok.encode_segments(segments, add_bos=True)
            supervised = [r == "assistant" for r in roles]
        else:
            segments = [(chat.IMAGE_TAG, "image") if s.is_image else (s.text, "text") for s in rec.segments]
            ids, roles = tok.encode_segments(segments, add_bos=True)
            ids, supervised = ids + [tok.eos_id], [r == "text" for r in roles] + [True]
        ids = np.asarray(ids, np.int32)
        supervised = np.asarray(supervised, bool)
        image = ids == tok.image_token_id
        if int(image.sum()) != rec.num_images:
            raise R.RecordError("image count mismatch",
                              f"{int(image.sum())} image placeholder token(s) for {rec.num_images} image(s)")
        return ids, supervised & ~image

    def images(self, rec: R.Record) -> dict[str, np.ndarray]:
        """Decoded, squared, resized and normalised views of every image: {key: [n, 3, S, S]}."""
        squares = []
        for k, blob in enumerate(rec.images):
            try:
                squares.append(self.processor.unit_image(blob, name=f"{rec.source}/{rec.record_id} image {k}"))
            except image_lib.ImageError as e:
                raise R.RecordError(image_error_reason(e), str(e)) from None
        if not squares:
            return self.empty_views()
        views = image_lib.model_views(np.stack(squares), self.model_config)
        for key, value in views.items():
            if not np.isfinite(value).all():  # cannot happen from uint8 pixels; guards the trainer anyway
                raise R.RecordError("non-finite pixels", key)
        return views

    def empty_views(self) -> dict[str, np.ndarray]:
        cfg = self.model_config
        out = {"pixel_values": np.zeros((0, 3, cfg.siglip.image_size, cfg.siglip.image_size), np.float32)}
        if cfg.is_hybrid:
            out["high_res_pixel_values"] = np.zeros((0, 3, cfg.sam.image_size, cfg.sam.image_size), np.float32)
        return out
