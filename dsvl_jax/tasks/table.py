"""Family `table`: a small spreadsheet-like table; look a cell up by its row and column headers."""
from __future__ import annotations

import numpy as np

from .difficulty import STANDARD, Difficulty
from .example import Rendered
from .render import Canvas, ink_for, jitter, pick

TASK = "table"
KINDS = ("cell", "row_max", "column_max")
ROW_NAMES = ("Oslo", "Rome", "Lima", "Pune", "Cairo", "Kyiv", "Bern", "Doha")
COLUMN_SCHEMES = (
    ("Q1", "Q2", "Q3", "Q4"),
    ("Jan", "Feb", "Mar", "Apr"),
    ("Mon", "Tue", "Wed", "Thu"),
    ("A", "B", "C", "D"),
)

_HEADER_COLORS = ((60, 90, 160), (40, 120, 90), (130, 60, 120), (90, 90, 90), (200, 220, 240), (230, 230, 200))
_QUESTIONS = {
    "cell": ("What is the value for {row} in {column}?", "What is {row} in column {column}?",
             "Which number is in row {row}, column {column}?"),
    "row_max": ("Which row has the highest {column}?", "Which city has the largest value in {column}?"),
    "column_max": ("Which column is highest for {row}?", "In row {row}, which column has the largest value?"),
}


def answer_vocabulary(level: Difficulty = STANDARD) -> frozenset[str]:
    columns = {c for scheme in COLUMN_SCHEMES for c in scheme}
    return frozenset(ROW_NAMES) | frozenset(columns) | frozenset(str(v) for v in range(1, level.max_cell + 1))


def _grid(rng: np.random.Generator, rows: int, columns: int, max_cell: int) -> np.ndarray:
    """Cell values with a unique maximum in every row and every column, so the *_max questions are unique."""
    while True:
        grid = rng.integers(1, max_cell + 1, size=(rows, columns))
        row_ok = all((r == r.max()).sum() == 1 for r in grid)
        col_ok = all((c == c.max()).sum() == 1 for c in grid.T)
        if row_ok and col_ok:
            return grid


def build(rng: np.random.Generator, image_size: int, level: Difficulty = STANDARD) -> Rendered:
    n_rows = int(rng.integers(level.table_rows[0], level.table_rows[1] + 1))
    n_cols = int(rng.integers(level.table_columns[0], level.table_columns[1] + 1))
    row_names = pick(rng, ROW_NAMES, n_rows)
    scheme = pick(rng, COLUMN_SCHEMES)
    start = int(rng.integers(0, len(scheme) - n_cols + 1))
    col_names = list(scheme[start:start + n_cols])
    grid = _grid(rng, n_rows, n_cols, level.max_cell)

    page = jitter(pick(rng, ((255, 255, 255), (247, 247, 242), (236, 240, 246))), rng, 4)
    canvas = Canvas(image_size, page)
    face = pick(rng, level.faces)
    font = canvas.font(face, rng.uniform(9.0, 10.5))
    ink = jitter((30, 30, 30), rng, 15)
    header_fill = jitter(pick(rng, _HEADER_COLORS), rng, 10)
    header_ink = ink_for(header_fill)
    stripe = tuple(max(0, c - 14) for c in page) if rng.random() < 0.5 else None
    line = tuple(max(0, c - 90) for c in page)

    margin = canvas.px(rng.uniform(2.0, 5.0))
    while True:  # shrink the font until the widest header and the widest number fit their columns
        name_width = max(font.measure(n)[0] for n in row_names) + canvas.px(6)
        col_width = (image_size - 2 * margin - name_width) / n_cols
        widest = max(font.measure(t)[0] for t in [*col_names, "88"])
        if widest + canvas.px(4) <= col_width or font.size <= canvas.font(face, 7.0).size:
            break
        font = font.smaller()
    row_height = min(font.measure("Hg")[1] + canvas.px(7), (image_size - 2 * margin) / (n_rows + 1))
    top = int(rng.integers(margin, max(margin + 1, image_size - margin - row_height * (n_rows + 1))))
    x_edges = [margin] + [margin + name_width + col_width * j for j in range(n_cols + 1)]
    y_edges = [top + row_height * i for i in range(n_rows + 2)]

    canvas.draw.rectangle((x_edges[0], y_edges[0], x_edges[-1], y_edges[1]), fill=header_fill)
    for i in range(n_rows):
        if stripe is not None and i % 2 == 1:
            canvas.draw.rectangle((x_edges[0], y_edges[i + 1], x_edges[-1], y_edges[i + 2]), fill=stripe)
    for x in x_edges:
        canvas.draw.line((round(x), y_edges[0], round(x), y_edges[-1]), fill=line, width=1)
    for y in y_edges:
        canvas.draw.line((x_edges[0], round(y), x_edges[-1], round(y)), fill=line, width=1)

    def center(row: int, col: int) -> tuple[float, float]:  # row/col 0 are the header row/column
        return (x_edges[col] + x_edges[col + 1]) / 2, (y_edges[row] + y_edges[row + 1]) / 2

    for j, name in enumerate(col_names):
        canvas.text(center(0, j + 1), name, font, header_ink, role="column", anchor="mm")
    cells = []
    for i, name in enumerate(row_names):
        canvas.text((x_edges[0] + canvas.px(3), center(i + 1, 0)[1]), name, font, ink, role="row", anchor="lm")
        for j in range(n_cols):
            box = canvas.text(center(i + 1, j + 1), str(grid[i, j]), font, ink, role="cell", anchor="mm")
            cells.append({"row": name, "column": col_names[j], "value": int(grid[i, j]), "box": list(box.box)})

    kind = pick(rng, KINDS)
    r, c = int(rng.integers(n_rows)), int(rng.integers(n_cols))
    question = pick(rng, _QUESTIONS[kind]).format(row=row_names[r], column=col_names[c])
    answer, entities, role = {
        "cell": (str(grid[r, c]), [row_names[r], col_names[c]], "cell"),
        "row_max": (row_names[int(grid[:, c].argmax())], [col_names[c]], "row"),
        "column_max": (col_names[int(grid[r].argmax())], [row_names[r]], "column"),
    }[kind]
    meta = {
        "rows": row_names,
        "columns": col_names,
        "grid": grid.tolist(),
        "cells": cells,
        "face": font.effective_face,
        "texts": canvas.text_records(),
        "question_entities": entities,
        "answer_role": role,
    }
    return Rendered(canvas.finish(rng, level.max_noise), question, answer, kind, meta)


def fact(rng: np.random.Generator) -> str:
    row, other = pick(rng, ROW_NAMES, 2)
    column = pick(rng, pick(rng, COLUMN_SCHEMES))
    a, b = pick(rng, range(1, STANDARD.max_cell + 1), 2)
    return pick(rng, (
        f"In the table, {row} has {a} in {column}.",
        f"The row {row} and the column {column} meet at the cell {a}.",
        f"{row} has {a} and {other} has {b} in {column}, so {row if a > b else other} is higher.",
        "A table cell is found by its row header on the left and its column header on top.",
    ))
