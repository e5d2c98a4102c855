"""How hard the suite is: the few knobs that decide how much a model must read, count and tolerate.

"standard" is the suite as designed (two-digit numbers, three layouts of noise and font variety). "easy" is a
fallback for very small compute budgets: single-digit numbers, one font face, smaller layouts, printed bar
values and fewer shapes. Its answers are a subset of the standard answers, so a tokenizer trained on one works
for both. Choose it per split with `make_split(..., difficulty="easy")`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difficulty:
    name: str
    faces: tuple[str, ...]  # font faces drawn from (a repeat weights the draw)
    max_noise: float  # largest Gaussian noise sigma, in 0-255 pixel units
    max_price: int  # document: largest line price
    max_quantity: int  # document: largest quantity
    max_lines: int  # document: most item lines on a receipt
    chart_values_printed: float  # chart: probability that each bar carries its value as text
    max_cell: int  # table: largest cell value
    table_rows: tuple[int, int]  # table: inclusive range of body rows
    table_columns: tuple[int, int]  # table: inclusive range of value columns
    map_grids: tuple[tuple[int, int], ...]  # map: (rows, columns) layouts
    max_count: int  # scene: largest count of one colour or shape
    max_shapes: int  # scene: most shapes in a picture


STANDARD = Difficulty(
    name="standard", faces=("sans", "sans", "pixel"), max_noise=4.0,
    max_price=19, max_quantity=5, max_lines=4,
    chart_values_printed=0.5,
    max_cell=99, table_rows=(3, 4), table_columns=(2, 3),
    map_grids=((2, 2), (2, 3), (3, 2), (3, 3)),
    max_count=5, max_shapes=8,
)
EASY = Difficulty(
    name="easy", faces=("sans",), max_noise=2.0,
    max_price=9, max_quantity=3, max_lines=3,
    chart_values_printed=1.0,
    max_cell=9, table_rows=(3, 3), table_columns=(2, 2),
    map_grids=((2, 2), (2, 3)),
    max_count=4, max_shapes=6,
)
DIFFICULTIES: dict[str, Difficulty] = {level.name: level for level in (STANDARD, EASY)}


def get_difficulty(name: str | Difficulty) -> Difficulty:
    if isinstance(name, Difficulty):
        return name
    try:
        return DIFFICULTIES[name]
    except KeyError:
        raise ValueError(f"difficulty must be one of {tuple(DIFFICULTIES)}, got {name!r}") from None
