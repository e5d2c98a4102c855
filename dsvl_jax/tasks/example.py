"""The record every task family produces, and the answer scorer."""
from __future__ import annotations

import io
import re
import string
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Example:
    """One request: an image, an instruction about it, the short answer and the family it came from.

    `meta` holds how the example was drawn (values, boxes of every string, shape positions), so tests and
    error analysis can check the answer against the pixels without re-deriving the layout.
    """

    image: Image.Image
    question: str
    answer: str
    task: str
    id: str
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace runs to one space, strip the ends and any trailing punctuation."""
    text = re.sub(r"\s+", " ", str(text)).strip().lower()
    return text.rstrip(string.punctuation).rstrip()


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after normalising only whitespace, case and trailing punctuation ("Red." == " red")."""
    return normalize_answer(prediction) == normalize_answer(answer)


@dataclass
class Rendered:
    """What a family's `build(rng, image_size)` returns; `generate` wraps it into an `Example`."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    meta: dict[str, Any]
