"""A transcription of everything a task image shows, from the example's drawing record (`Example.meta`).

These are the demo's image–text pairs (stage 1 and the multimodal share of stage 2): a dense caption
supervises every string and value in the picture, where a question supervises one. They are written from
what was drawn, never from the question, so they teach reading, not answering.
"""
from __future__ import annotations

from collections import Counter

from dsvl_jax.tasks import Example


def _document(m: dict) -> str:
    lines = ", ".join(f"{x['quantity']} {x['item']} {x['price']}" for x in m["lines"])
    return f"{m['store']} receipt: {lines}, total {m['total']}."


def _chart(m: dict) -> str:
    title = " ".join(_texts(m, "title")) or "chart"
    bars = ", ".join(f"{b['label']} {b['value']}" for b in m["bars"])
    return f"{title} bar chart: {bars}."


def _table(m: dict) -> str:
    rows = "; ".join(f"{r} " + " ".join(f"{c} {v}" for c, v in zip(m["columns"], values))
                     for r, values in zip(m["rows"], m["grid"]))
    return f"table: {rows}."


def _texts(m: dict, role: str) -> list[str]:
    return [t["text"] for t in m["texts"] if t["role"] == role]


def _ui(m: dict) -> str:
    name = " ".join(_texts(m, "title") + _texts(m, "url"))
    fields = "".join(f"{f} field, " for f in _texts(m, "field"))
    buttons = ", ".join(f"{b['color']} {b['label']} button {b['position']}" for b in m["buttons"])
    return f"{name} screen: {fields}{buttons}."


def _map(m: dict) -> str:
    rows = " / ".join(" ".join(row) for row in m["grid"])
    objects = "".join(f", {o['object']} in {o['room']}" for o in m["objects"])
    return f"{' '.join(_texts(m, 'title')) or 'plan'}: {rows}{objects}."


def _scene(m: dict) -> str:
    counts = Counter((s["color"], s["shape"]) for s in m["shapes"])
    parts = ", ".join(f"{n} {color} {shape}" for (color, shape), n in sorted(counts.items()))
    return f"{len(m['shapes'])} shapes: {parts}."


_BY_FAMILY = {"document": _document, "chart": _chart, "table": _table, "ui": _ui, "map": _map, "scene": _scene}


def describe(example: Example) -> str:
    """One line naming every string and value drawn in `example.image`."""
    try:
        return _BY_FAMILY[example.task](example.meta)
    except KeyError:
        raise ValueError(f"no caption rule for task family {example.task!r}") from None
