"""Input side: images (numpy + PIL), the official chat format, tokenizers, and the `Processor`.

`image`, `chat` and `tokenizer` import neither jax nor torch, so data-loader workers can use them.
"""
from dsvl_jax.processing.chat import IMAGE_TAG, SYSTEM_PROMPT, format_prompt, render_segments
from dsvl_jax.processing.image import ImageError, load_image, model_views, square_image, to_rgb
from dsvl_jax.processing.processor import Processor, expand_image_tokens
from dsvl_jax.processing.tokenizer import Tokenizer

__all__ = [
    "IMAGE_TAG", "SYSTEM_PROMPT", "format_prompt", "render_segments",
    "ImageError", "load_image", "model_views", "square_image", "to_rgb",
    "Processor", "expand_image_tokens", "Tokenizer",
]
