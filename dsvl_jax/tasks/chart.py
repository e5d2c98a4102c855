"""Family `chart`: a vertical bar chart; read one bar's value, name the largest/smallest bar, or the trend."""
from __future__ import annotations

import numpy as np

from .difficulty import STANDARD, Difficulty
from .example import Rendered
from .render import COLORS, Canvas, jitter, pick

TASK = "chart"
KINDS = ("value", "largest", "smallest", "trend")
LABEL_SCHEMES = (
    ("A", "B", "C", "D", "E"),
    ("Q1", "Q2", "Q3", "Q4"),
    ("Mon", "Tue", "Wed", "Thu", "Fri"),
    ("Jan", "Feb", "Mar", "Apr", "May"),
)
TITLES = ("Sales", "Visits", "Rain", "Score", "Users", "Sold")
BAR_COLORS = ("blue", "orange", "green", "red", "purple", "gray")
MAX_VALUE = 9  # bars show 1..9 on a 0..10 axis, so every bar is visible and below the frame
AXIS_MAX = 10
TRENDS = ("up", "down")

_QUESTIONS = {
    "value": ("What is the value of {label}?", "How high is the {label} bar?", "What value does {label} show?"),
    "largest": ("Which bar is the largest?", "Which label has the highest value?", "Which bar is tallest?"),
    "smallest": ("Which bar is the smallest?", "Which label has the lowest value?", "Which bar is shortest?"),
    "trend": ("Is the trend up or down?", "Do the values go up or down?", "Is the chart going up or down?"),
}


def answer_vocabulary(level: Difficulty = STANDARD) -> frozenset[str]:
    labels = {label for scheme in LABEL_SCHEMES for label in scheme}
    return frozenset(labels) | frozenset(TRENDS) | frozenset(str(v) for v in range(1, MAX_VALUE + 1))


def _values(rng: np.random.Generator, count: int, kind: str) -> tuple[list[int], str | None]:
    """Bar values; a trend chart is monotone (one inner swap allowed), others have a unique max and min."""
    if kind == "trend":
        values = sorted(int(v) for v in rng.choice(np.arange(1, MAX_VALUE + 1), size=count, replace=False))
        if count >= 4 and rng.random() < 0.3:  # a small wiggle inside, first and last stay the extremes
            i = int(rng.integers(1, count - 2))
            values[i], values[i + 1] = values[i + 1], values[i]
        trend = pick(rng, TRENDS)
        return (values if trend == "up" else values[::-1]), trend
    while True:
        values = [int(v) for v in rng.integers(1, MAX_VALUE + 1, size=count)]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            trend = "up" if values[-1] > values[0] else "down" if values[-1] < values[0] else None
            return values, trend


def build(rng: np.random.Generator, image_size: int, level: Difficulty = STANDARD) -> Rendered:
    kind = pick(rng, KINDS)
    scheme = pick(rng, LABEL_SCHEMES)
    count = int(rng.integers(3, len(scheme) + 1))
    start = int(rng.integers(0, len(scheme) - count + 1))
    labels = list(scheme[start:start + count])
    values, trend = _values(rng, count, kind)

    background = jitter(pick(rng, ((255, 255, 255), (248, 248, 240), (240, 244, 250))), rng, 4)
    canvas = Canvas(image_size, background)
    face = pick(rng, level.faces)
    ink = jitter((40, 40, 40), rng, 15)
    title_font = canvas.font(face, rng.uniform(9.0, 10.5))
    tick_font = canvas.font(face, 8.0)
    label_font = canvas.font(face, 8.5)
    canvas.text((image_size / 2, canvas.px(2)), pick(rng, TITLES), title_font, ink, role="title", anchor="mt")

    plot_left, plot_right = canvas.px(17), image_size - canvas.px(3)
    plot_top, baseline = canvas.px(17), image_size - canvas.px(13)
    per_unit = (baseline - plot_top) / AXIS_MAX
    grid = tuple(int(0.85 * c + 0.15 * 128) for c in background)
    for v in range(0, AXIS_MAX + 1, 2):
        y = round(baseline - v * per_unit)
        canvas.draw.line((plot_left, y, plot_right, y), fill=grid, width=1)
        if v % 5 == 0 or v == AXIS_MAX:
            canvas.text((plot_left - canvas.px(3), y), str(v), tick_font, ink, role="tick", anchor="rm")
    canvas.draw.line((plot_left, plot_top, plot_left, baseline), fill=ink, width=1)

    color_name = pick(rng, BAR_COLORS)
    bar_color = jitter(COLORS[color_name], rng, 10)
    slot = (plot_right - plot_left) / count
    while max(label_font.measure(x)[0] for x in labels) + canvas.px(1.5) > slot and label_font.size > 5:
        label_font = label_font.smaller()  # labels must not run together
    bar_width = max(3, int(round(slot * rng.uniform(0.55, 0.75))))
    show_values = bool(rng.random() < level.chart_values_printed)
    bars = []
    for i, (label, value) in enumerate(zip(labels, values)):
        center = plot_left + slot * (i + 0.5)
        x0 = int(round(center - bar_width / 2))
        top = int(round(baseline - value * per_unit))
        canvas.draw.rectangle((x0, top, x0 + bar_width - 1, baseline - 1), fill=bar_color)
        bars.append({"label": label, "value": value, "x0": x0, "x1": x0 + bar_width, "top": top})
        canvas.text((center, baseline + canvas.px(2)), label, label_font, ink, role="label", anchor="mt")
        if show_values:
            canvas.text((center, top - canvas.px(1)), str(value), tick_font, ink, role="value", anchor="mb")
    canvas.draw.line((plot_left, baseline, plot_right, baseline), fill=ink, width=1)

    bar = pick(rng, bars)
    question = pick(rng, _QUESTIONS[kind]).format(label=bar["label"])
    answer = {
        "value": str(bar["value"]),
        "largest": labels[values.index(max(values))],
        "smallest": labels[values.index(min(values))],
        "trend": trend,
    }[kind]
    meta = {
        "bars": bars,
        "baseline": baseline,
        "pixels_per_unit": per_unit,
        "bar_color": list(bar_color),
        "bar_color_name": color_name,
        "values_printed": show_values,
        "face": label_font.effective_face,
        "texts": canvas.text_records(),
        "question_entities": [bar["label"]] if kind == "value" else [],
    }
    return Rendered(canvas.finish(rng, level.max_noise), question, answer, kind, meta)


def fact(rng: np.random.Generator) -> str:
    scheme = pick(rng, LABEL_SCHEMES)
    a, b = pick(rng, scheme, 2)
    va, vb = pick(rng, range(1, MAX_VALUE + 1), 2)
    bigger = a if va > vb else b
    return pick(rng, (
        f"In the bar chart, {a} has value {va} and {b} has value {vb}, so {bigger} is larger.",
        f"The bar for {a} reaches {va} on the axis.",
        "When the bars rise from left to right, the trend is up.",
        "When the bars fall from left to right, the trend is down.",
        f"The tallest bar has the largest value; here it is {bigger}.",
    ))
