"""Family `scene`: a natural-scene proxy (sky, ground, trees, clouds) with coloured shapes to count and name."""
from __future__ import annotations

import numpy as np

from .difficulty import STANDARD, Difficulty
from .example import Rendered
from .render import COLORS, Canvas, jitter, pick

TASK = "scene"
KINDS = ("count_color", "count_shape", "color_of_shape", "count_all")
SHAPES = ("circle", "square", "triangle")
SHAPE_COLORS = ("red", "blue", "yellow", "purple", "orange", "pink")  # none close to sky, grass, sand or bark
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_GROUNDS = ((80, 160, 70), (215, 195, 150), (110, 150, 80), (235, 238, 242))  # grass, sand, meadow, snow

_QUESTIONS = {
    "count_color": ("How many {color} shapes are there?", "How many {color} objects can you see?",
                    "Count the {color} shapes."),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} can you see?", "Count the {shapes}."),
    "color_of_shape": ("What color is the {shape}?", "Which color is the {shape}?"),
    "count_all": ("How many shapes are there?", "How many objects are in the picture?"),
}


def answer_vocabulary(level: Difficulty = STANDARD) -> frozenset[str]:
    return frozenset(SHAPE_COLORS) | frozenset(str(n) for n in range(level.max_shapes + 1))


def _inventory(rng: np.random.Generator, kind: str, level: Difficulty) -> tuple[list[tuple[str, str]], dict]:
    """The (shape, colour) list to draw, built so the asked-for count or colour is what we decided first."""
    def others(n, avoid_color=None, avoid_shape=None):
        colors = [c for c in SHAPE_COLORS if c != avoid_color]
        shapes = [s for s in SHAPES if s != avoid_shape]
        return [(pick(rng, shapes), pick(rng, colors)) for _ in range(n)]

    if kind == "count_color":
        color = pick(rng, SHAPE_COLORS)
        k = 0 if rng.random() < 0.1 else int(rng.integers(1, level.max_count + 1))
        items = [(pick(rng, SHAPES), color) for _ in range(k)] + others(int(rng.integers(1 if k == 0 else 0, 4)),
                                                                         avoid_color=color)
        return items, {"color": color}
    if kind == "count_shape":
        shape = pick(rng, SHAPES)
        k = 0 if rng.random() < 0.1 else int(rng.integers(1, level.max_count + 1))
        items = [(shape, pick(rng, SHAPE_COLORS)) for _ in range(k)] + others(int(rng.integers(1 if k == 0 else 0, 4)),
                                                                              avoid_shape=shape)
        return items, {"shape": shape}
    if kind == "color_of_shape":
        shape, color = pick(rng, SHAPES), pick(rng, SHAPE_COLORS)
        return [(shape, color)] + others(int(rng.integers(1, 5)), avoid_shape=shape), {"shape": shape}
    return others(int(rng.integers(1, level.max_shapes))), {}


def draw_shape(canvas: Canvas, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        canvas.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        canvas.draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        canvas.draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


def _backdrop(canvas: Canvas, rng: np.random.Generator) -> tuple[int, list[tuple[float, float, float]]]:
    """Sky gradient, ground, clouds and trees; return the horizon y and discs that shapes must avoid."""
    size, px = canvas.size, canvas.px
    horizon = int(size * rng.uniform(0.3, 0.55))
    top, bottom = np.array(jitter((120, 170, 230), rng, 15)), np.array(jitter((200, 225, 245), rng, 8))
    for y in range(horizon):
        canvas.draw.line((0, y, size, y), fill=tuple(int(v) for v in top + (bottom - top) * y / max(1, horizon)))
    ground = jitter(pick(rng, _GROUNDS), rng, 10)
    canvas.draw.rectangle((0, horizon, size, size), fill=ground)
    darker = tuple(max(0, c - 25) for c in ground)
    for _ in range(int(rng.integers(5, 15))):  # grass or ripples: short darker strokes
        x, y = rng.uniform(0, size), rng.uniform(horizon + 2, size)
        canvas.draw.line((x, y, x + px(2), y - px(2)), fill=darker, width=1)
    for _ in range(int(rng.integers(0, 3))):
        x, y, w = rng.uniform(0, size), rng.uniform(2, max(3, horizon - px(8))), px(rng.uniform(10, 18))
        canvas.draw.ellipse((x, y, x + w, y + w * 0.45), fill=(244, 246, 250))
    keep_out = []
    for _ in range(int(rng.integers(0, 3))):
        x, r = rng.uniform(px(6), size - px(6)), px(rng.uniform(4, 6))
        y = horizon + rng.uniform(-px(4), px(4))
        canvas.draw.rectangle((x - px(1), y, x + px(1), y + px(8)), fill=(100, 70, 40))
        canvas.draw.ellipse((x - r, y - 2 * r, x + r, y + r * 0.3), fill=(30, 100, 45))
        keep_out.append((x, y, 2.2 * r + px(8)))
    return horizon, keep_out


def build(rng: np.random.Generator, image_size: int, level: Difficulty = STANDARD) -> Rendered:
    kind = pick(rng, KINDS)
    while True:
        items, target = _inventory(rng, kind, level)
        if 1 <= len(items) <= level.max_shapes:
            break
    canvas = Canvas(image_size, (255, 255, 255))
    horizon, keep_out = _backdrop(canvas, rng)
    gap = canvas.px(3)
    placed: list[dict] = []
    for shape, color in items:
        for _ in range(200):  # rejection sampling: shapes never touch, so each is one blob in the image
            r = canvas.px(rng.uniform(5.0, 8.0))
            cx = rng.uniform(r + 1, image_size - r - 1)
            cy = rng.uniform(r + 1, image_size - r - 1)
            clear = all(np.hypot(cx - p["cx"], cy - p["cy"]) > r + p["r"] + gap for p in placed)
            clear &= all(np.hypot(cx - x, cy - y) > r + rr for x, y, rr in keep_out)
            if clear:
                break
        else:
            raise RuntimeError(f"scene: could not place {len(items)} shapes at image_size={image_size}")
        fill = jitter(COLORS[color], rng, 10)
        draw_shape(canvas, shape, cx, cy, r, fill)
        placed.append({"shape": shape, "color": color, "cx": float(cx), "cy": float(cy), "r": float(r),
                       "fill": list(fill)})

    if kind == "count_color":
        question = pick(rng, _QUESTIONS[kind]).format(color=target["color"])
        answer = str(sum(p["color"] == target["color"] for p in placed))
    elif kind == "count_shape":
        question = pick(rng, _QUESTIONS[kind]).format(shapes=_PLURAL[target["shape"]])
        answer = str(sum(p["shape"] == target["shape"] for p in placed))
    elif kind == "color_of_shape":
        question = pick(rng, _QUESTIONS[kind]).format(shape=target["shape"])
        answer = next(p["color"] for p in placed if p["shape"] == target["shape"])
    else:
        question = pick(rng, _QUESTIONS[kind])
        answer = str(len(placed))
    meta = {"shapes": placed, "horizon": horizon, "target": target, "texts": [], "question_entities": []}
    return Rendered(canvas.finish(rng, level.max_noise), question, answer, kind, meta)


def fact(rng: np.random.Generator) -> str:
    a, b = pick(rng, SHAPE_COLORS, 2)
    shape = pick(rng, SHAPES)
    n, m = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    word = _PLURAL[shape] if n > 1 else shape
    return pick(rng, (
        f"There {'are' if n > 1 else 'is'} {n} {a} {word} and {m} {b} one{'s' if m > 1 else ''}, so {n + m} in all.",
        f"The {shape} in the picture is {a}.",
        "A triangle has three corners and a square has four.",
        f"If you see {n} {a} shapes and {m} {b} shapes, you see {n + m} shapes.",
        "The sky is above the horizon and the grass is below it.",
    ))
