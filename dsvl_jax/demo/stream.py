"""The task suite as an endless record source: train request *i* is drawn when the loader asks for it.

A fixed pool of a few thousand images, seen 16 times each, lets a from-scratch model memorise pictures
instead of learning to read them. `SuiteStream` is a Grain random-access source whose item *i* is the
serialised record of train example *i* (`tasks.split_keys` order: families round-robin, the train seed
stream), rendered on demand in whichever process reads it (the Grain workers when `data.workers > 0`).
Its length is large enough that a demo run never sees an image twice; the held-out split uses other seeds.

    SourceConfig(name="qa", generator="dsvl_jax.demo.stream:SuiteStream",
                 generator_args=dict(kind="qa", families=FAMILIES, image_size=96, difficulty="standard"))
"""
from __future__ import annotations

from typing import Sequence

from dsvl_jax import tasks
from dsvl_jax.data import records as R
from dsvl_jax.demo import data

KINDS = {"qa": data.qa_record, "transcribe": data.transcribe_record, "caption": data.caption_record}


class SuiteStream:
    """Random access to serialised records of the train split, drawn on demand (`kind`: qa, transcribe or
    caption). Deterministic: item i is the same bytes in every process and every run."""

    def __init__(self, kind: str, families: Sequence[str], image_size: int, difficulty: str = "standard",
                 seed: int = 0, length: int = 1_000_000, offset: int = 0):
        if kind not in KINDS:
            raise ValueError(f"SuiteStream kind={kind!r}: expected one of {sorted(KINDS)}")
        tasks.split_keys("train", 0, families)  # a clear error for an unknown family, before any worker starts
        self.kind, self.families, self.image_size = kind, tuple(families), int(image_size)
        self.difficulty, self.seed, self.length, self.offset = difficulty, int(seed), int(length), int(offset)
        self._stream = tasks.split_seed("train", self.seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> bytes:
        i = int(i) + self.offset
        family = self.families[i % len(self.families)]
        example = tasks.generate(family, self._stream, i // len(self.families), self.image_size, self.difficulty)
        return R.serialize(KINDS[self.kind](example, example.png_bytes()))

    def __repr__(self) -> str:
        return (f"SuiteStream(kind={self.kind!r}, families={self.families}, image_size={self.image_size}, "
                f"difficulty={self.difficulty!r}, seed={self.seed}, length={self.length})")
