"""Family `ui`: a phone-app or web-page screenshot with coloured buttons; find a button's colour or place."""
from __future__ import annotations

import numpy as np

from .difficulty import STANDARD, Difficulty
from .example import Rendered
from .render import COLORS, Canvas, ink_for, jitter, pick

TASK = "ui"
KINDS = ("color_of", "position_of", "label_of_color", "label_at")
LABELS = ("OK", "Save", "Send", "Back", "Next", "Login", "Buy", "Help", "Menu", "Edit", "Exit", "Share")
BUTTON_COLORS = ("red", "green", "blue", "orange", "purple", "gray", "pink", "black")
VERTICAL = ("top", "middle", "bottom")
HORIZONTAL = ("left", "center", "right")
APPS = ("Mail", "Shop", "Notes", "Bank", "Maps", "Music")
SITES = ("shop.com", "news.org", "mail.net", "bank.com")
FIELDS = ("email", "name", "search", "password")

_QUESTIONS = {
    "color_of": ("What color is the {label} button?", "Which color does the {label} button have?"),
    "position_of": ("Where is the {label} button?", "Where is the button that says {label}?"),
    "label_of_color": ("What does the {color} button say?", "Which button is {color}?"),
    "label_at": ("Which button is at the {position}?", "What does the {position} button say?"),
}


def answer_vocabulary(level: Difficulty = STANDARD) -> frozenset[str]:
    return frozenset(LABELS) | frozenset(BUTTON_COLORS) | frozenset(VERTICAL) | frozenset(HORIZONTAL)


def _slots(count: int, vertical: bool) -> list[str]:
    names = VERTICAL if vertical else HORIZONTAL
    return list(names) if count == 3 else [names[0], names[2]]


def _chrome(canvas: Canvas, rng: np.random.Generator, face: str) -> int:
    """Draw a phone status/title bar or a browser bar; return the y where content may start."""
    size = canvas.size
    small = canvas.font(face, 7.5)
    if rng.random() < 0.5:  # phone app
        bar = jitter(pick(rng, ((30, 30, 30), (245, 245, 245), (40, 70, 140))), rng, 8)
        canvas.draw.rectangle((0, 0, size, canvas.px(9)), fill=bar)
        canvas.text((canvas.px(3), canvas.px(1)), pick(rng, ("9:41", "12:30", "8:05")), small, ink_for(bar), "clock")
        canvas.draw.rectangle((size - canvas.px(13), canvas.px(3), size - canvas.px(4), canvas.px(6)),
                              outline=ink_for(bar))
        title_bar = jitter(pick(rng, ((250, 250, 250), (230, 236, 245), (60, 60, 70))), rng, 6)
        canvas.draw.rectangle((0, canvas.px(9), size, canvas.px(22)), fill=title_bar)
        title = canvas.font(face, 9.5)
        canvas.text((size / 2, canvas.px(15.5)), pick(rng, APPS), title, ink_for(title_bar), "title", anchor="mm")
        return canvas.px(24)
    bar = jitter((222, 222, 226), rng, 6)  # web page: window dots and an address bar
    canvas.draw.rectangle((0, 0, size, canvas.px(13)), fill=bar)
    for k, color in enumerate(((237, 95, 87), (245, 190, 60), (95, 200, 80))):
        x = canvas.px(4 + 5 * k)
        canvas.draw.ellipse((x, canvas.px(5), x + canvas.px(3), canvas.px(8)), fill=color)
    field = (canvas.px(21), canvas.px(3), size - canvas.px(3), canvas.px(11))
    canvas.draw.rounded_rectangle(field, radius=canvas.px(2), fill=(252, 252, 252))
    canvas.text((canvas.px(24), canvas.px(7)), pick(rng, SITES), small, (90, 90, 90), "url", anchor="lm")
    return canvas.px(16)


def build(rng: np.random.Generator, image_size: int, level: Difficulty = STANDARD) -> Rendered:
    page = jitter(pick(rng, ((255, 255, 255), (244, 246, 250), (250, 248, 240), (34, 36, 44))), rng, 4)
    canvas = Canvas(image_size, page)
    face = pick(rng, level.faces)
    content_top = _chrome(canvas, rng, face)
    size, margin = image_size, canvas.px(6)

    if rng.random() < 0.5:  # a text field above the buttons, as on a login or search form
        field_h = canvas.px(11)
        box = (margin, content_top + canvas.px(2), size - margin, content_top + canvas.px(2) + field_h)
        canvas.draw.rounded_rectangle(box, radius=canvas.px(2), outline=(150, 150, 150), fill=page)
        canvas.text((margin + canvas.px(3), (box[1] + box[3]) / 2), pick(rng, FIELDS), canvas.font(face, 7.5),
                    (140, 140, 140), "field", anchor="lm")
        content_top = box[3] + canvas.px(2)

    vertical = bool(rng.integers(2))
    count = int(rng.integers(2, 4))
    slots = _slots(count, vertical)
    labels = pick(rng, LABELS, count)
    dark_page = ink_for(page) == (250, 250, 250)
    colors = pick(rng, [c for c in BUTTON_COLORS if not (dark_page and c == "black")], count)
    font = canvas.font(face, rng.uniform(8.5, 10.0) if vertical else 8.0)
    area_top, area_bottom = content_top + canvas.px(2), size - canvas.px(3)
    row_y = area_top + (area_bottom - area_top) * rng.uniform(0.35, 0.65)  # a horizontal row shares one y
    buttons = []
    for k, (slot, label, color_name) in enumerate(zip(slots, labels, colors)):
        if vertical:
            cell_h = (area_bottom - area_top) / count
            height = min(cell_h - canvas.px(3), canvas.px(16))
            width = canvas.px(rng.uniform(48.0, 76.0))
            cx, cy = size / 2, area_top + cell_h * (k + 0.5)
        else:
            slot_w = (size - 2 * canvas.px(3)) / count
            width, height = slot_w - canvas.px(4), canvas.px(15)
            cx = canvas.px(3) + slot_w * (k + 0.5)
            cy = row_y
        box = (round(cx - width / 2), round(cy - height / 2), round(cx + width / 2), round(cy + height / 2))
        fill = jitter(COLORS[color_name], rng, 10)
        canvas.draw.rounded_rectangle(box, radius=canvas.px(rng.uniform(1.0, 5.0)), fill=fill)
        canvas.text((cx, cy), label, font, ink_for(fill), role="button", anchor="mm")
        buttons.append({"label": label, "color": color_name, "fill": list(fill), "position": slot, "box": list(box)})

    kind = pick(rng, KINDS)
    target = pick(rng, buttons)
    question = pick(rng, _QUESTIONS[kind]).format(label=target["label"], color=target["color"],
                                                  position=target["position"])
    answer, entities = {
        "color_of": (target["color"], [target["label"]]),
        "position_of": (target["position"], [target["label"]]),
        "label_of_color": (target["label"], [target["color"]]),
        "label_at": (target["label"], [target["position"]]),
    }[kind]
    meta = {
        "buttons": buttons,
        "layout": "vertical" if vertical else "horizontal",
        "target": target["label"],
        "face": font.effective_face,
        "texts": canvas.text_records(),
        "question_entities": entities,
        "answer_role": "button" if kind.startswith("label") else None,
    }
    return Rendered(canvas.finish(rng, level.max_noise), question, answer, kind, meta)


def fact(rng: np.random.Generator) -> str:
    a, b = pick(rng, LABELS, 2)
    color = pick(rng, BUTTON_COLORS)
    return pick(rng, (
        f"The {a} button is {color}.",
        f"On the screen, the {a} button is above the {b} button, so {b} is lower.",
        f"The {color} button says {a}.",
        f"In a row of three buttons, the {a} button on the left comes before the center one.",
        "A web page has an address bar at the top; an app has a status bar with the time.",
    ))
