"""Family `document`: a shop receipt photographed on a table; read the total, a quantity, a price or an item."""
from __future__ import annotations

import numpy as np

from .difficulty import STANDARD, Difficulty
from .example import Rendered
from .render import Canvas, jitter, pick

TASK = "document"
KINDS = ("total", "quantity", "price", "item")
ITEMS = ("apple", "bread", "milk", "tea", "rice", "eggs", "fish", "soap", "cake", "jam", "corn", "salt")
STORES = ("MART", "CAFE", "SHOP", "DELI", "STORE", "BAKERY")

_TABLE_COLORS = ((150, 111, 80), (120, 120, 128), (90, 110, 140), (170, 150, 120), (70, 90, 70))
_PAPER_COLORS = ((250, 250, 245), (246, 240, 225), (238, 238, 238), (255, 252, 235))

_QUESTIONS = {
    "total": ("What is the total?", "What is the total on the receipt?", "How much is the total?"),
    "quantity": ("How many units of {item} were bought?", "What quantity of {item} is on the receipt?"),
    "price": ("What is the price of {item}?", "How much does the {item} line cost?"),
    "item": ("Which item costs {price}?", "What item has a price of {price}?"),
}


def answer_vocabulary(level: Difficulty = STANDARD) -> frozenset[str]:
    totals = range(1, level.max_lines * level.max_price + 1)
    return frozenset(ITEMS) | frozenset(str(v) for v in totals)


def _lines(rng: np.random.Generator, level: Difficulty) -> list[tuple[str, int, int]]:
    """(item, quantity, line price) rows with distinct items and distinct prices, so every question is unique."""
    count = int(rng.integers(2, level.max_lines + 1))
    items = pick(rng, ITEMS, count)
    prices = pick(rng, range(1, level.max_price + 1), count)
    quantities = [int(rng.integers(1, level.max_quantity + 1)) for _ in range(count)]
    return list(zip(items, quantities, [int(p) for p in prices]))


def build(rng: np.random.Generator, image_size: int, level: Difficulty = STANDARD) -> Rendered:
    lines = _lines(rng, level)
    total = sum(price for _, _, price in lines)
    canvas = Canvas(image_size, jitter(pick(rng, _TABLE_COLORS), rng, 15))
    face = pick(rng, level.faces)
    font = canvas.font(face, rng.uniform(9.0, 11.0))
    spacing = canvas.px(rng.uniform(3.0, 4.5))
    quantity_first = bool(rng.integers(2))
    currency = pick(rng, ("", "", "$"))
    store, total_label = pick(rng, STORES), pick(rng, ("TOTAL", "Total"))
    pad, gap = canvas.px(5), canvas.px(4)
    paper_w = canvas.px(rng.uniform(70.0, 84.0))
    rows = len(lines) + 2  # store name + items + total
    while True:  # shrink the font until the receipt fits the image and no price touches its item text
        line_height = font.measure("Hg")[1] + spacing
        paper_h = rows * line_height + canvas.px(10)
        texts = [f"{q} {i}" if quantity_first else f"{i} x{q}" for i, q, _ in lines]
        widest = max(font.measure(t)[0] + gap + font.measure(f"{currency}{p}")[0]
                     for t, (_, _, p) in zip(texts, lines))
        widest = max(widest, font.measure(f"{total_label} {currency}{total}")[0] + gap)
        width = max(paper_w, widest + 2 * pad)
        fits = width <= image_size - canvas.px(4) and paper_h <= image_size - canvas.px(2)
        if fits or font.size <= 5:
            paper_w = min(width, image_size - canvas.px(4))
            break
        font = font.smaller()
    x0 = int(rng.integers(canvas.px(2), max(canvas.px(2) + 1, image_size - paper_w - canvas.px(2))))
    y0 = int(rng.integers(canvas.px(1), max(canvas.px(1) + 1, image_size - paper_h - canvas.px(1))))
    paper = jitter(pick(rng, _PAPER_COLORS), rng, 5)
    shadow = tuple(max(0, c - 45) for c in canvas.background)
    canvas.draw.rectangle((x0 + 2, y0 + 2, x0 + paper_w + 2, y0 + paper_h + 2), fill=shadow)
    canvas.draw.rectangle((x0, y0, x0 + paper_w, y0 + paper_h), fill=paper)

    ink = jitter((30, 30, 40), rng, 20)
    left, right, y = x0 + pad, x0 + paper_w - pad, y0 + canvas.px(4)
    canvas.text((x0 + paper_w / 2, y), store, font, ink, role="store", anchor="mt")
    y += line_height
    rule_y = y - canvas.px(2)
    canvas.draw.line((left, rule_y, right, rule_y), fill=ink, width=1)
    for item, quantity, price in lines:
        if quantity_first:
            q = canvas.text((left, y), f"{quantity}", font, ink, role="quantity")
            canvas.text((q.box[2] + canvas.px(4), y), item, font, ink, role="item")
        else:
            i = canvas.text((left, y), item, font, ink, role="item")
            canvas.text((i.box[2] + canvas.px(3), y), f"x{quantity}", font, ink, role="quantity")
        canvas.text((right, y), f"{currency}{price}", font, ink, role="price", anchor="rt")
        y += line_height
    rule_y = y - canvas.px(2)
    canvas.draw.line((left, rule_y, right, rule_y), fill=ink, width=1)
    canvas.text((left, y), total_label, font, ink, role="total_label")
    canvas.text((right, y), f"{currency}{total}", font, ink, role="total", anchor="rt")

    kind = pick(rng, KINDS)
    item, quantity, price = pick(rng, lines)
    template = pick(rng, _QUESTIONS[kind])
    question = template.format(item=item, price=price)
    answer = {"total": str(total), "quantity": str(quantity), "price": str(price), "item": item}[kind]
    entities = {"total": [], "quantity": [item], "price": [item], "item": [str(price)]}[kind]
    meta = {
        "lines": [{"item": i, "quantity": q, "price": p} for i, q, p in lines],
        "total": total,
        "store": store,
        "face": font.effective_face,
        "texts": canvas.text_records(),
        "question_entities": entities,
        "answer_role": kind,  # the role of the drawn string that holds the answer
    }
    return Rendered(canvas.finish(rng, level.max_noise), question, answer, kind, meta)


def fact(rng: np.random.Generator) -> str:
    """One text-only sentence about receipts, for the text part of the stage-2 mixture."""
    lines = _lines(rng, STANDARD)
    (a, qa, pa), (b, qb, pb) = lines[0], lines[1]
    return pick(rng, (
        f"A receipt lists {qa} {a} for {pa} and {qb} {b} for {pb}, so the total is {pa + pb}.",
        f"The {a} line costs {pa} and the {b} line costs {pb}; together they cost {pa + pb}.",
        f"On the receipt, {qa} {a} were bought.",
        "The total on a receipt is the sum of every price above it.",
        f"If the {a} line costs {pa}, then the item that costs {pa} is {a}.",
    ))
