"""Synthetic real-world VQA suite (documents, charts, tables, UI screenshots, floor plans, scenes).

Generated with PIL from a seed, nothing downloaded; short answers so exact match is meaningful.
"""
from __future__ import annotations

from .conversation import IMAGE_PLACEHOLDER, to_conversation
from .corpus import text_corpus
from .difficulty import DIFFICULTIES, EASY, STANDARD, Difficulty
from .example import Example, exact_match, normalize_answer
from .suite import (FAMILIES, SPLITS, answer_vocabulary, generate, iter_split, make_split, question_kinds,
                    split_keys, split_seed)

__all__ = [
    "DIFFICULTIES", "EASY", "FAMILIES", "SPLITS", "STANDARD", "IMAGE_PLACEHOLDER", "Difficulty", "Example", "answer_vocabulary", "exact_match", "generate",
    "iter_split", "make_split", "normalize_answer", "question_kinds", "split_keys", "split_seed", "text_corpus",
    "to_conversation",
]
