"""The task suite: six real-world families behind one deterministic `generate`, plus train/held-out splits.

Every example is a pure function of (family, seed, index, image_size): its random stream is
`SeedSequence([seed, family number, index])`. The train split draws from even seeds and the held-out split
from odd ones (`split_seed`), so the two never share a stream whatever base seed is asked for.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import ModuleType

import numpy as np

from . import chart, document, floorplan, scene, table, ui
from .difficulty import Difficulty, get_difficulty
from .example import Example

# Family numbers are part of the seed: never renumber, only append.
_FAMILY_MODULES: dict[str, tuple[int, ModuleType]] = {
    document.TASK: (1, document),
    chart.TASK: (2, chart),
    table.TASK: (3, table),
    ui.TASK: (4, ui),
    floorplan.TASK: (5, floorplan),
    scene.TASK: (6, scene),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILY_MODULES)
SPLITS = ("train", "heldout")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 48, 1024


def family_module(family: str) -> ModuleType:
    try:
        return _FAMILY_MODULES[family][1]
    except KeyError:
        raise ValueError(f"unknown task family {family!r}; known families: {FAMILIES}") from None


def require_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate(family: str, seed: int, index: int, image_size: int = 96,
             difficulty: str | Difficulty = "standard") -> Example:
    """Example number `index` of `family` in the stream `seed`, drawn at `image_size` x `image_size` pixels."""
    number, module = _FAMILY_MODULES.get(family, (None, None))
    if module is None:
        raise ValueError(f"unknown task family {family!r}; known families: {FAMILIES}")
    seed, index = require_int("seed", seed), require_int("index", index)
    image_size = require_int("image_size", image_size, MIN_IMAGE_SIZE)
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be <= {MAX_IMAGE_SIZE}, got {image_size}")
    level = get_difficulty(difficulty)
    rng = np.random.default_rng(np.random.SeedSequence([seed, number, index]))
    rendered = module.build(rng, image_size, level)
    rendered.meta["difficulty"] = level.name
    tag = "" if level.name == "standard" else f"-{level.name}"
    return Example(
        image=rendered.image,
        question=rendered.question,
        answer=rendered.answer,
        task=family,
        id=f"{family}{tag}-s{seed}-i{index}",
        kind=rendered.kind,
        meta=rendered.meta,
    )


def split_seed(split: str, seed: int = 0) -> int:
    """The generator seed a split uses: train takes even seeds, held-out odd ones, so they never overlap."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return 2 * require_int("seed", seed) + SPLITS.index(split)


def split_keys(split: str, n: int, families: Sequence[str] = FAMILIES, seed: int = 0) -> list[tuple[str, int, int]]:
    """(family, generator seed, index) of each example of a split, round-robin over `families`."""
    families = tuple(families)
    if not families:
        raise ValueError("families must name at least one task family")
    for family in families:
        family_module(family)
    stream = split_seed(split, seed)
    n = require_int("n", n)
    return [(families[i % len(families)], stream, i // len(families)) for i in range(n)]


def iter_split(split: str = "train", n: int = 1000, families: Sequence[str] = FAMILIES, image_size: int = 96,
               seed: int = 0, difficulty: str | Difficulty = "standard") -> Iterator[Example]:
    """Lazily yield the examples `make_split` would return."""
    level = get_difficulty(difficulty)
    for family, stream, index in split_keys(split, n, families, seed):
        yield generate(family, stream, index, image_size, level)


def make_split(split: str = "train", n: int = 1000, families: Sequence[str] = FAMILIES, image_size: int = 96,
               seed: int = 0, difficulty: str | Difficulty = "standard") -> list[Example]:
    """`n` examples interleaving `families` (equal shares); "heldout" uses seed streams train never touches."""
    return list(iter_split(split, n, families, image_size, seed, difficulty))


def answer_vocabulary(family: str, difficulty: str | Difficulty = "standard") -> frozenset[str]:
    """Every answer `family` can produce at `difficulty` (exact strings)."""
    return family_module(family).answer_vocabulary(get_difficulty(difficulty))


def question_kinds(family: str) -> tuple[str, ...]:
    return tuple(family_module(family).KINDS)
