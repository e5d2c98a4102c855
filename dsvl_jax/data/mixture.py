"""Weighted mixing of sources, the text:multimodal split and the modality warm-up.

Two levels, both stateless functions of an index so that a restored iterator replays them exactly:

- **Modality of a packed row** (text or multimodal): `ModalitySchedule.row_modality(step, row)`. The
  multimodal share rises linearly from 0 to its target over `warmup_steps` (paper §4.4: the language
  share starts at 1.0 and is lowered to ~0.7) and is a function of the *step*. With modality grouping
  every row of a step gets the same modality (one decision per step, the same on every process).
  Decisions use a Weyl sequence u_k = frac(offset + k·(√5−1)/2) compared with the share: it is
  deterministic, needs no state, and any window of n decisions is within about (1 + log n)/n of the
  target (a random draw would drift by 1/√n).
- **Source of an example within a modality**: grain's `MapDataset.mix`, which interleaves the
  (shuffled, repeated, process-sharded) sources in exact integer proportions by random access.

Rows, not examples, are the unit of the text:multimodal split: rows are full packed sequences, so
the split is one of tokens, which is how the paper's 7:3 ratio reads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

TEXT, MULTIMODAL = 0, 1
MODALITIES = ("text", "multimodal")

# Paper Table 1 (stage 2): shares of the joint pretraining mixture, in percent.
PAPER_STAGE2_TABLE1 = {
    "interleaved": 13.1, "caption": 11.1, "table_chart": 2.1, "web_code": 0.4,
    "scene_ocr": 1.2, "doc_ocr": 2.1, "text": 70.0,
}
PAPER_TEXT_SHARE = 0.7  # language : multimodal = 7 : 3 (§3.2.2)

_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One corpus: ArrayRecord shards (`paths`: files, a glob or a directory), a prepared TFDS dir, or a
    `generator`: "module:Class" of a random-access source of serialised records built with `generator_args`
    (records made on demand, e.g. `dsvl_jax.demo.stream.SuiteStream`: data that never repeats)."""

    name: str
    paths: str | tuple[str, ...] | None = None
    tfds_dir: str | None = None
    weight: float = 1.0
    modality: str = "multimodal"  # "text" rows carry no images; "multimodal" rows may
    generator: str | None = None
    generator_args: dict | None = None

    def __post_init__(self):
        given = [k for k in ("paths", "tfds_dir", "generator") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"source {self.name!r}: give exactly one of paths=, tfds_dir= or generator= "
                             f"(got {given or 'none'})")
        if self.generator is not None and ":" not in self.generator:
            raise ValueError(f"source {self.name!r}: generator={self.generator!r} must read 'module:Class'")
        args = self.generator_args
        object.__setattr__(self, "generator_args", dict(args.to_dict() if hasattr(args, "to_dict") else args or {}))
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight={self.weight} must be > 0")
        if self.modality not in MODALITIES:
            raise ValueError(f"source {self.name!r}: modality={self.modality!r}, expected one of {MODALITIES}")

    @property
    def modality_index(self) -> int:
        return MODALITIES.index(self.modality)


@dataclasses.dataclass(frozen=True)
class ModalitySchedule:
    """Which modality each packed row comes from, as a function of (step, row)."""

    mm_share: float  # target multimodal share of rows, after warm-up
    warmup_steps: int = 0  # multimodal share ramps linearly 0 -> mm_share over these steps
    grouping: bool = False  # one modality per global step (paper §4.4 "modality grouping")
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.mm_share <= 1.0:
            raise ValueError(f"mm_share={self.mm_share} must lie in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.warmup_steps and self.mm_share == 1.0:
            raise ValueError("a modality warm-up needs text sources (mm_share=1.0 leaves none to start from)")

    @classmethod
    def from_sources(cls, sources: Sequence[SourceConfig], **kw) -> "ModalitySchedule":
        total = sum(s.weight for s in sources)
        mm = sum(s.weight for s in sources if s.modality == "multimodal")
        return cls(mm_share=mm / total, **kw)

    def share_at(self, step: int) -> float:
        """Target multimodal share of the rows of `step`."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.mm_share * step / self.warmup_steps
        return self.mm_share

    def _uniform(self, k: int) -> float:
        offset = ((self.seed * 2654435761) % 2**32) / 2**32
        return (offset + k * _PHI) % 1.0

    def row_modality(self, step: int, global_row: int, global_batch: int) -> int:
        """TEXT or MULTIMODAL for row `global_row` (0..global_batch-1) of `step`."""
        share = self.share_at(step)
        if share <= 0.0:
            return TEXT
        if share >= 1.0:
            return MULTIMODAL
        k = step if self.grouping else step * global_batch + global_row
        return MULTIMODAL if self._uniform(k) < share else TEXT

    def step_is_text_only(self, step: int) -> bool:
        """True when every row of `step`, on every process, is a text row (vision towers can be skipped)."""
        if self.share_at(step) <= 0.0:
            return True
        return self.grouping and self.row_modality(step, 0, 1) == TEXT


def within_modality_weights(sources: Sequence[SourceConfig], modality: str) -> list[float]:
    return [s.weight for s in sources if s.modality == modality]


def mix_map_datasets(parts, weights: Sequence[float]):
    """Exact-proportion interleaving of infinite MapDatasets (grain's selection map)."""
    import grain

    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(list(parts), weights=list(weights))


def source_selection(weights: Sequence[float], n: int) -> list[int]:
    """Index of the source of each of the first `n` examples of a modality stream (cheap: no data).

    Runs the same `mix_map_datasets` the pipeline uses, over constant stand-in sources.
    """
    import grain

    parts = [grain.MapDataset.source([k]).repeat() for k in range(len(weights))]
    mixed = mix_map_datasets(parts, weights)
    return [mixed[i] for i in range(n)]
