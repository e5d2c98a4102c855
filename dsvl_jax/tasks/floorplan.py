"""Family `map`: a north-up floor plan with labelled rooms and furniture icons; answer where things are."""
from __future__ import annotations

import numpy as np

from .difficulty import STANDARD, Difficulty
from .example import Rendered
from .render import Canvas, jitter, pick

TASK = "map"
KINDS = ("left_of", "right_of", "north_of", "south_of", "object_in")
ROOMS = ("bath", "bed", "den", "hall", "gym", "study", "porch", "lobby", "lab")
OBJECTS = ("plant", "lamp", "sofa", "tv")
TITLES = ("Floor 1", "Floor 2", "Plan", "Level 1")

# (row step, column step) to the neighbour each relation asks for; north is up (the compass says so).
_STEPS = {"left_of": (0, -1), "right_of": (0, 1), "north_of": (-1, 0), "south_of": (1, 0)}
_QUESTIONS = {
    "left_of": ("Which room is left of the {room}?", "Which room is west of the {room}?"),
    "right_of": ("Which room is right of the {room}?", "Which room is east of the {room}?"),
    "north_of": ("Which room is north of the {room}?", "Which room is above the {room}?"),
    "south_of": ("Which room is south of the {room}?", "Which room is below the {room}?"),
    "object_in": ("Which room has the {object}?", "Where is the {object}?", "In which room is the {object}?"),
}
_ROOM_TINTS = ((250, 246, 232), (236, 244, 250), (240, 250, 236), (250, 238, 238), (244, 240, 250),
               (255, 255, 255))


def answer_vocabulary(level: Difficulty = STANDARD) -> frozenset[str]:
    return frozenset(ROOMS)


def _icon(canvas: Canvas, name: str, cx: float, cy: float, s: float) -> tuple[int, int, int, int]:
    """Draw a furniture symbol of size ~s centred at (cx, cy); return its box."""
    d, h = canvas.draw, s / 2
    if name == "plant":
        d.polygon([(cx - h * 0.6, cy + h * 0.1), (cx + h * 0.6, cy + h * 0.1), (cx + h * 0.4, cy + h),
                   (cx - h * 0.4, cy + h)], fill=(140, 80, 40))
        d.ellipse((cx - h * 0.8, cy - h, cx + h * 0.8, cy + h * 0.3), fill=(40, 150, 50))
    elif name == "lamp":
        d.polygon([(cx, cy - h), (cx + h * 0.8, cy), (cx - h * 0.8, cy)], fill=(240, 200, 20))
        d.line((cx, cy, cx, cy + h), fill=(50, 50, 50), width=max(1, round(s / 8)))
        d.line((cx - h * 0.5, cy + h, cx + h * 0.5, cy + h), fill=(50, 50, 50), width=max(1, round(s / 8)))
    elif name == "sofa":
        d.rectangle((cx - h, cy - h * 0.5, cx + h, cy + h * 0.6), fill=(120, 60, 150))
        d.rectangle((cx - h * 0.6, cy - h * 0.1, cx + h * 0.6, cy + h * 0.6), fill=(180, 130, 210))
    elif name == "tv":
        d.rectangle((cx - h, cy - h * 0.7, cx + h, cy + h * 0.5), fill=(25, 25, 25))
        d.rectangle((cx - h * 0.7, cy - h * 0.45, cx + h * 0.7, cy + h * 0.25), fill=(90, 140, 200))
        d.line((cx - h * 0.4, cy + h * 0.8, cx + h * 0.4, cy + h * 0.8), fill=(25, 25, 25), width=1)
    else:
        raise ValueError(f"unknown object {name!r}; known: {OBJECTS}")
    return (round(cx - h), round(cy - h), round(cx + h), round(cy + h))


def _compass(canvas: Canvas, x: float, y: float, face: str, ink) -> None:
    """A north arrow with an N above it, anchored at its top centre (x, y)."""
    s = canvas.unit
    canvas.text((x, y), "N", canvas.font(face, 7.0), ink, role="compass", anchor="mt")
    tip, base = y + 9.5 * s, y + 14 * s
    canvas.draw.polygon([(x, tip), (x + 2.5 * s, base), (x - 2.5 * s, base)], fill=ink)


def build(rng: np.random.Generator, image_size: int, level: Difficulty = STANDARD) -> Rendered:
    n_rows, n_cols = pick(rng, level.map_grids)
    names = pick(rng, ROOMS, n_rows * n_cols)
    layout = [names[r * n_cols:(r + 1) * n_cols] for r in range(n_rows)]

    paper = jitter(pick(rng, ((255, 255, 255), (246, 244, 236), (236, 240, 244))), rng, 4)
    canvas = Canvas(image_size, paper)
    face = pick(rng, level.faces)
    ink = jitter((40, 40, 50), rng, 12)
    size = image_size
    canvas.text((canvas.px(3), canvas.px(2)), pick(rng, TITLES), canvas.font(face, 8.0), ink, role="title")
    _compass(canvas, size - canvas.px(7), canvas.px(0.5), face, ink)

    x0, x1 = canvas.px(rng.uniform(2.0, 5.0)), size - canvas.px(rng.uniform(2.0, 5.0))
    y0, y1 = canvas.px(14), size - canvas.px(rng.uniform(2.0, 4.0))
    room_w, room_h = (x1 - x0) / n_cols, (y1 - y0) / n_rows
    tinted = rng.random() < 0.6
    font = canvas.font(face, 8.5 if n_cols == 2 else 7.5)
    wall = max(1, canvas.px(1.6))
    rooms = []
    for r in range(n_rows):
        for c in range(n_cols):
            box = (x0 + c * room_w, y0 + r * room_h, x0 + (c + 1) * room_w, y0 + (r + 1) * room_h)
            fill = jitter(pick(rng, _ROOM_TINTS), rng, 4) if tinted else paper
            canvas.draw.rectangle(tuple(round(v) for v in box), fill=fill)
            rooms.append({"name": layout[r][c], "row": r, "col": c, "box": [round(v) for v in box]})
    for r in range(n_rows):  # interior walls, each with a door gap
        for c in range(n_cols):
            left, top, right, bottom = rooms[r * n_cols + c]["box"]
            door = canvas.px(6)
            if c + 1 < n_cols:
                gap = top + rng.uniform(0.25, 0.75) * (bottom - top)
                canvas.draw.line((right, top, right, gap - door / 2), fill=ink, width=wall)
                canvas.draw.line((right, gap + door / 2, right, bottom), fill=ink, width=wall)
            if r + 1 < n_rows:
                gap = left + rng.uniform(0.25, 0.75) * (right - left)
                canvas.draw.line((left, bottom, gap - door / 2, bottom), fill=ink, width=wall)
                canvas.draw.line((gap + door / 2, bottom, right, bottom), fill=ink, width=wall)
    canvas.draw.rectangle((round(x0), round(y0), round(x1), round(y1)), outline=ink, width=wall + 1)

    for room in rooms:
        left, top, right, bottom = room["box"]
        cx = (left + right) / 2
        canvas.text((cx, top + (bottom - top) * 0.32), room["name"], font, ink, role="room", anchor="mm")
    n_objects = int(rng.integers(1, min(3, len(rooms)) + 1))
    holders = pick(rng, range(len(rooms)), n_objects)
    objects = []
    for name, k in zip(pick(rng, OBJECTS, n_objects), holders):
        left, top, right, bottom = rooms[k]["box"]
        icon = min(room_w, room_h) * 0.38
        cx = left + (right - left) * rng.uniform(0.35, 0.65)
        box = _icon(canvas, name, cx, top + (bottom - top) * 0.7, icon)
        objects.append({"object": name, "room": rooms[k]["name"], "box": list(box)})

    kind = pick(rng, KINDS)
    if kind == "object_in":
        target = pick(rng, objects)
        question = pick(rng, _QUESTIONS[kind]).format(object=target["object"])
        answer, entities = target["room"], [target["object"]]
    else:
        dr, dc = _STEPS[kind]
        sources = [(r, c) for r in range(n_rows) for c in range(n_cols)
                   if 0 <= r + dr < n_rows and 0 <= c + dc < n_cols]
        r, c = pick(rng, sources)
        question = pick(rng, _QUESTIONS[kind]).format(room=layout[r][c])
        answer, entities = layout[r + dr][c + dc], [layout[r][c]]
    meta = {
        "grid": layout,
        "rooms": rooms,
        "objects": objects,
        "face": font.effective_face,
        "texts": canvas.text_records(),
        "question_entities": entities,
        "answer_role": "room",
    }
    return Rendered(canvas.finish(rng, level.max_noise), question, answer, kind, meta)


def fact(rng: np.random.Generator) -> str:
    a, b = pick(rng, ROOMS, 2)
    thing = pick(rng, OBJECTS)
    return pick(rng, (
        f"The {a} is left of the {b}, so the {b} is right of the {a}.",
        f"The {a} is north of the {b}, so the {b} is south of the {a}.",
        f"The {thing} stands in the {a}.",
        "On a floor plan with the north arrow pointing up, west is left and east is right.",
        f"The {a} is above the {b} on the plan, which means it is further north.",
    ))
