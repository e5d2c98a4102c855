"""The conversation view the data pipeline consumes, in DeepSeek-VL's chat format."""
from __future__ import annotations

from .example import Example

IMAGE_PLACEHOLDER = "<image_placeholder>"  # the official image tag (processor_config `image_tag`)


def to_conversation(example: Example) -> list[dict]:
    """[User turn with one image placeholder followed by the question, Assistant turn with the answer].

    Roles are the official "User"/"Assistant"; the placeholder comes right before the question with no
    separator, as in DeepSeek-VL's own examples. `images` holds the PIL image (the official loader takes
    paths; an in-memory image is what `load_pil_images` would have produced).
    """
    return [
        {"role": "User", "content": f"{IMAGE_PLACEHOLDER}{example.question}", "images": [example.image]},
        {"role": "Assistant", "content": example.answer, "images": []},
    ]
