"""Text-only corpus about the same world as the image tasks, for the text share of stage-2 (7:3 text:multimodal)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .suite import FAMILIES, require_int, family_module

_CORPUS_SALT = 7919  # keeps corpus streams apart from image streams that share a seed


def text_corpus(n: int, seed: int = 0, families: Sequence[str] = FAMILIES) -> list[str]:
    """`n` short paragraphs (two or three sentences, one family each, round-robin over `families`).

    Paragraph i depends only on (seed, i), so a prefix of a longer corpus is the shorter corpus.
    """
    n, seed = require_int("n", n), require_int("seed", seed)
    modules = [family_module(f) for f in families]
    if not modules:
        raise ValueError("families must name at least one task family")
    paragraphs = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _CORPUS_SALT, i]))
        module = modules[i % len(modules)]
        paragraphs.append(" ".join(module.fact(rng) for _ in range(int(rng.integers(2, 4)))))
    return paragraphs
