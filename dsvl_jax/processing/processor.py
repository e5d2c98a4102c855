"""`Processor`: conversations (or formatted prompts) + images → the numpy batch the model takes.

Output (all numpy):
  input_ids [B, T] int32, left-padded with the pad id (EOS), BOS first, each `<image_placeholder>`
      expanded to `cfg.num_image_tokens` copies of the image id (no begin/end-of-image tokens);
  attention_mask [B, T] int32;
  pixel_values [N, 3, s, s] float32 and, for the hybrid, high_res_pixel_values [N, 3, S, S]: the HF-port
      contract, N = all images of the batch in row-major order (sample by sample, in text order);
  images [B, N_max, 3, S, S] float32 in [0, 1], images_seq_mask [B, T] bool and images_emb_mask
      [B, N_max, num_image_tokens] bool: the official `batchify` contract (N_max = max(1, most images
      in one sample); absent images are zeros with a False mask).

Every check (unreadable image, placeholder/image count mismatch, too long for `max_length` or the
model context, tokenizer/model id mismatch) raises here, before any model code runs.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import folders  # jax-free: config files and folder names only
from dsvl_jax.processing import image as image_ops
from dsvl_jax.processing.chat import SYSTEM_PROMPT, conversation_images, format_prompt
from dsvl_jax.processing.tokenizer import Tokenizer


def expand_image_tokens(ids: Sequence[int], image_token_id: int, n: int) -> list[int]:
    """Replace each occurrence of `image_token_id` by `n` copies of it (the official `add_image_token`)."""
    if n < 1:
        raise ValueError(f"n={n}: an image needs at least one token")
    out: list[int] = []
    for tok in ids:
        if tok == image_token_id:
            out.extend([image_token_id] * n)
        else:
            out.append(tok)
    return out


def _is_conversation(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) > 0 and all(
        isinstance(m, Mapping) for m in x)


class Processor:
    """Tokenizer + model config → model inputs, in the official `deepseek` format."""

    def __init__(self, tokenizer: Tokenizer, config: VLMConfig, *, system_prompt: str = SYSTEM_PROMPT,
                 max_pixels: int = image_ops.DEFAULT_MAX_PIXELS, min_size: int = 14):
        if tokenizer.image_token_id != config.image_token_id:
            raise ValueError(
                f"tokenizer {tokenizer.source!r} puts {tokenizer.image_token!r} at id {tokenizer.image_token_id} "
                f"but the model config says image_token_id={config.image_token_id}; build the config with "
                f"image_token_id={tokenizer.image_token_id} or use the matching tokenizer")
        if tokenizer.vocab_size > config.text.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.source!r} has {tokenizer.vocab_size} ids but the model "
                             f"embeds only text.vocab_size={config.text.vocab_size}")
        self.tokenizer = tokenizer
        self.config = config
        self.system_prompt = system_prompt
        self.max_pixels = max_pixels
        self.min_size = min_size
        self.image_size = config.image_size
        self.num_image_tokens = config.num_image_tokens
        self.background = image_ops.processor_background(config)

    @classmethod
    def from_pretrained(cls, directory, config: VLMConfig | None = None, **kwargs) -> "Processor":
        """The processor of a checkpoint folder: an HF-port or official-layout folder, an Orbax training
        checkpoint (workdir, checkpoints dir or step dir; the trainer copies the tokenizer into the
        workdir), a `dsvl-convert` output, or a folder whose config.json holds `VLMConfig.to_dict()`.

        The tokenizer comes from the folder (tokenizer.json or tokenizer.model); the model config is
        `config`, or else the folder's (only config files are read, never the weights). A tokenizer
        folder without a model config needs `config=`."""
        directory = os.fspath(directory)
        if config is None:
            has_config = os.path.isfile(os.path.join(directory, "config.json")) or folders.is_orbax(directory)
            if os.path.isdir(directory) and not has_config:
                raise FileNotFoundError(f"{directory}: no model config (config.json, or an Orbax checkpoint's "
                                        "model_config.json); pass config=VLMConfig(...)")
            found = folders.describe(directory)
            config, files = found.config, found.files_dir
        else:
            files = folders.describe_files(directory)
        return cls(Tokenizer.from_file(files), config, **kwargs)

    # ---- single steps, usable on their own ----
    def format(self, conversation: Sequence[Mapping]) -> str:
        return format_prompt(conversation, system_prompt=self.system_prompt)

    def unit_image(self, source, *, name: str | None = None) -> np.ndarray:
        """One image → float32 [3, S, S] in [0, 1] (the official processor)."""
        return image_ops.square_image(source, self.image_size, self.background, min_size=self.min_size,
                                      name=name, max_pixels=self.max_pixels)

    def encode_prompt(self, text: str, n_images: int, where: str = "prompt") -> list[int]:
        """Formatted text → ids with BOS and expanded image tokens; checks the placeholder count."""
        ids = self.tokenizer.encode(text, add_bos=True)
        n_tags = sum(1 for t in ids if t == self.tokenizer.image_token_id)
        if n_tags != n_images:
            raise ValueError(f"{where}: {n_tags} {self.tokenizer.image_token!r} placeholder(s) in the text but "
                             f"{n_images} image(s) given")
        return expand_image_tokens(ids, self.tokenizer.image_token_id, self.num_image_tokens)

    # ---- the batch ----
    def _samples(self, inputs, images) -> list[tuple[str, list, str]]:
        """Normalise the accepted input forms into (text, image sources, label) per sample."""
        if isinstance(inputs, str) or _is_conversation(inputs):
            inputs = [inputs]
            images = None if images is None else [images]
        if not isinstance(inputs, Sequence) or not inputs:
            raise ValueError("expected a conversation, a prompt string, or a non-empty list of either")
        if images is not None and (not isinstance(images, Sequence) or len(images) != len(inputs)):
            raise ValueError(f"images must hold one list per sample: {len(inputs)} sample(s), "
                             f"got {len(images) if isinstance(images, Sequence) else type(images).__name__}")
        samples = []
        for b, item in enumerate(inputs):
            label = f"sample {b}"
            given = None if images is None else images[b]
            if given is not None and (isinstance(given, (str, bytes)) or not isinstance(given, Sequence)):
                raise ValueError(f"{label}: images must be a list (one entry per placeholder)")
            if isinstance(item, str):
                text, found = item, list(given or [])
            elif _is_conversation(item):
                try:
                    text = self.format(item)
                    in_messages = conversation_images(item)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{label}: {e}") from None
                if given is not None and in_messages:
                    raise ValueError(f"{label}: images given both in the messages and in `images=`")
                found = list(given) if given is not None else in_messages
            else:
                raise ValueError(f"{label}: expected a conversation (list of dicts) or a prompt string, "
                                 f"got {type(item).__name__}")
            samples.append((text, found, label))
        return samples

    def __call__(self, inputs, images=None, *, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding: str = "longest") -> dict:
        """`inputs`: one conversation, one formatted prompt, or a list of either (a batch).

        Conversations carry their images in the messages' "images" lists (official form) or in
        `images` (one list per sample); prompts take theirs from `images`. An image is a path, bytes,
        a `data:image/...;base64,` string, a PIL image or a decoded uint8 array. `padding="max_length"`
        pads to `max_length` (otherwise to the longest sample), then up to `pad_to_multiple_of`.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding={padding!r}: expected 'longest' or 'max_length'")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        context = self.config.text.max_position_embeddings
        limit = context if max_length is None else min(max_length, context)
        samples = self._samples(inputs, images)

        token_rows, unit_images = [], []
        for text, sources, label in samples:
            ids = self.encode_prompt(text, len(sources), label)
            if len(ids) > limit:
                which = (f"max_length={max_length}" if max_length is not None and max_length <= context
                         else f"the model context ({context} positions)")
                raise ValueError(f"{label}: {len(ids)} tokens (with {len(sources)}×{self.num_image_tokens} image "
                                 f"tokens) exceed {which}")
            token_rows.append(ids)
            row_images = []
            for j, src in enumerate(sources):
                try:
                    row_images.append(self.unit_image(src))
                except image_ops.ImageError as e:
                    raise image_ops.ImageError(f"{label}, image {j}: {e}") from None
            unit_images.append(row_images)

        length = max_length if padding == "max_length" else max(len(r) for r in token_rows)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        return self._batch(token_rows, unit_images, length)

    def _batch(self, token_rows: list[list[int]], unit_images: list[list[np.ndarray]], length: int) -> dict:
        b = len(token_rows)
        s, n_tok = self.image_size, self.num_image_tokens
        n_max = max(1, max(len(r) for r in unit_images))
        input_ids = np.full((b, length), self.tokenizer.pad_id, np.int32)
        attention = np.zeros((b, length), np.int32)
        images = np.zeros((b, n_max, 3, s, s), np.float32)
        emb_mask = np.zeros((b, n_max, n_tok), bool)
        for i, (ids, row) in enumerate(zip(token_rows, unit_images)):
            input_ids[i, length - len(ids):] = ids
            attention[i, length - len(ids):] = 1
            for j, x in enumerate(row):
                images[i, j] = x
                emb_mask[i, j, :] = True
        seq_mask = (input_ids == self.tokenizer.image_token_id) & (attention == 1)
        flat = [x for row in unit_images for x in row]
        if flat:
            views = image_ops.model_views(np.stack(flat), self.config)
        else:
            views = {"pixel_values": np.zeros((0, 3, self.config.siglip.image_size, self.config.siglip.image_size),
                                              np.float32)}
            if self.config.is_hybrid:
                views["high_res_pixel_values"] = np.zeros((0, 3, s, s), np.float32)
        return {"input_ids": input_ids, "attention_mask": attention, **views, "images": images,
                "images_seq_mask": seq_mask, "images_emb_mask": emb_mask}


# ------------------------------------------------------------------------------------------------
# HF interop: the processor_config.json of the HF port, so an exported folder loads in transformers
# ------------------------------------------------------------------------------------------------
def hf_processor_config(config: VLMConfig) -> dict:
    """`processor_config.json` of `DeepseekVL(Hybrid)Processor` as the HF converters configure it for
    the released checkpoints (SigLIP view normalised by the image processor; 7B: bicubic to the SAM
    size + bilinear to the SigLIP size). Put it beside the tokenizer files of `build_bpe_tokenizer`
    (or the real tokenizer) and `DeepseekVL(Hybrid)Processor.from_pretrained(folder)` loads it."""
    low, s_low = config.siglip, config.siglip.image_size
    image = {
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_pad": True,
        "rescale_factor": image_ops.RESCALE_FACTOR, "min_size": 14,
        "size": {"height": s_low, "width": s_low},
        "image_mean": list(low.pixel_mean), "image_std": list(low.pixel_std),
        "background_color": list(image_ops.background_color(low.pixel_mean)),
    }
    if config.is_hybrid:
        high = config.sam
        image.update({
            "image_processor_type": "DeepseekVLHybridImageProcessor",
            "resample": 2,  # PIL BILINEAR for the low-res view (HF converter)
            "high_res_resample": 3,  # PIL BICUBIC
            "high_res_size": {"height": high.image_size, "width": high.image_size},
            "high_res_image_mean": list(high.pixel_mean), "high_res_image_std": list(high.pixel_std),
            "high_res_background_color": list(image_ops.background_color(high.pixel_mean)),
        })
        processor_class = "DeepseekVLHybridProcessor"
    else:
        image.update({"image_processor_type": "DeepseekVLImageProcessor", "resample": 3})
        processor_class = "DeepseekVLProcessor"
    return {"image_processor": image, "num_image_tokens": config.num_image_tokens,
            "processor_class": processor_class}


def write_hf_processor_config(directory, config: VLMConfig) -> str:
    path = os.path.join(os.fspath(directory), "processor_config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf_processor_config(config), f, indent=2)
    return path
