"""Small synthetic corpora of all record kinds, for tests, benchmarks and the demo (nothing downloaded).

    python -m dsvl_jax.data.synthetic DIR   # shards, a tokenizer that fits configs/tiny.py, sources.json, images/

Images are encoded PNGs (or any given encoded bytes); texts are word salad from a fixed vocabulary,
so that a tokenizer trained on `WORDS` covers them.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
from typing import Sequence

import numpy as np

from ..processing import chat
from ..processing.tokenizer_build import build_bpe_tokenizer
from . import records as R
from .mixture import SourceConfig

WORDS = ("the a of and image photo shows cat dog red blue green small large chart table text page "
         "what is in this picture describe it answer question left right top bottom").split()


def encode_image(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save_kw) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.asarray(pixels), mode) if mode else Image.fromarray(np.asarray(pixels))
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def random_image(rng: np.random.Generator, height: int, width: int, fmt: str = "PNG") -> bytes:
    return encode_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt)


def sentence(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words))


def text_record(rng, i: int, source: str = "text", n_words: int = 30) -> R.Record:
    return R.Record(f"{source}-{i}", source, "text", (R.text(sentence(rng, n_words)),))


def caption_record(rng, i: int, image: bytes, source: str = "caption") -> R.Record:
    return R.Record(f"{source}-{i}", source, "caption", (R.image(0), R.text(sentence(rng, 8))), (image,))


def interleaved_record(rng, i: int, images: Sequence[bytes], source: str = "interleaved") -> R.Record:
    segs = [R.text(sentence(rng, 6))]
    for k in range(len(images)):
        segs += [R.image(k), R.text(" " + sentence(rng, 6))]
    return R.Record(f"{source}-{i}", source, "interleaved", tuple(segs), tuple(images))


def conversation_record(rng, i: int, images: Sequence[bytes], source: str = "sft", turns: int = 1) -> R.Record:
    segs = [R.image(k) for k in range(len(images))]
    for t in range(turns):
        segs += [R.text(sentence(rng, 5) + "?", "user"), R.text(sentence(rng, 7), "assistant")]
    # images lead the first user turn, as in LLaVA-style data
    return R.Record(f"{source}-{i}", source, "sft", tuple(segs), tuple(images))


def write_corpus(directory: str, *, n_text: int = 32, n_caption: int = 16, n_interleaved: int = 8,
                 n_sft: int = 8, image_hw: tuple[int, int] = (24, 40), images: Sequence[bytes] | None = None,
                 seed: int = 0, num_shards: int = 2) -> tuple[SourceConfig, ...]:
    """Write one shard set per kind under `directory`; returns source configs (text weight 0.7).

    `images`: encoded images to cycle through (default: random PNGs of `image_hw`).
    """
    rng = np.random.default_rng(seed)
    pool = list(images) if images else [random_image(rng, *image_hw) for _ in range(8)]
    pick = lambda k: pool[k % len(pool)]  # noqa: E731
    kinds = {
        "text": [text_record(rng, i) for i in range(n_text)],
        "caption": [caption_record(rng, i, pick(i)) for i in range(n_caption)],
        "interleaved": [interleaved_record(rng, i, [pick(i), pick(i + 1)][: 1 + i % 2]) for i in range(n_interleaved)],
        "sft": [conversation_record(rng, i, [pick(i)], turns=1 + i % 2) for i in range(n_sft)],
    }
    sources = []
    mm_total = sum(len(v) for k, v in kinds.items() if k != "text" and v)
    for name, recs in kinds.items():
        if not recs:
            continue
        R.write_records(os.path.join(directory, name), recs, num_shards=num_shards)
        weight = 0.7 if name == "text" else 0.3 * len(recs) / mm_total
        sources.append(SourceConfig(name, os.path.join(directory, f"{name}-*.array_record"), weight=weight,
                                    modality="text" if name == "text" else "multimodal"))
    return tuple(sources)


def corpus_tokenizer(path: str, vocab_size: int = 512):
    """A byte-level BPE trained on `WORDS` and the chat template's words (ids fit `config.tiny()`)."""
    rng = np.random.default_rng(0)
    texts = [sentence(rng, 20) for _ in range(200)] + [chat.SYSTEM_PROMPT, "User: Assistant:"] * 20
    return build_bpe_tokenizer(texts, vocab_size, path)


def main(argv=None) -> None:
    """Write a corpus for `configs/tiny.py` under DIR: every record kind as shards, `tokenizer.json` (its ids
    fit `config.tiny()`), `sources.json` (the value of `--config.data.sources_json`) and a few PNGs to chat
    about in `images/`."""
    p = argparse.ArgumentParser(prog="python -m dsvl_jax.data.synthetic", description=main.__doc__)
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    pngs = [random_image(rng, 24, 40) for _ in range(4)]
    sources = write_corpus(a.directory, images=pngs, seed=a.seed)
    corpus_tokenizer(a.directory)
    os.makedirs(os.path.join(a.directory, "images"), exist_ok=True)
    for i, png in enumerate(pngs):
        with open(os.path.join(a.directory, "images", f"{i}.png"), "wb") as f:
            f.write(png)
    with open(os.path.join(a.directory, "sources.json"), "w") as f:
        json.dump([{k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})} for s in sources], f)
    print(f"wrote {len(sources)} sources, tokenizer.json, sources.json and images/ under {a.directory}")


if __name__ == "__main__":
    main()
