"""The synthetic real-world task suite (dsvl_jax/tasks): determinism, answers recoverable from pixels or from
the drawn layout, disjoint splits, non-degenerate answers, the scorer, the conversation view and speed."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from dsvl_jax import tasks
from dsvl_jax.tasks import render, scene, ui
from dsvl_jax.tasks.suite import FAMILIES, generate, make_split, split_keys, split_seed

SIZES = (64, 96, 128)


def _pixels(example) -> np.ndarray:
    return np.asarray(example.image, dtype=np.float32)


def _near(pixels: np.ndarray, rgb, tolerance: float) -> np.ndarray:
    return np.linalg.norm(pixels - np.asarray(rgb, dtype=np.float32), axis=-1) < tolerance


# ---------------------------------------------------------------- determinism and basic shape


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_bytes_and_text(family):
    for index in range(3):
        a, b = generate(family, 11, index, 96), generate(family, 11, index, 96)
        assert a.png_bytes() == b.png_bytes()
        assert (a.question, a.answer, a.id, a.kind) == (b.question, b.answer, b.id, b.kind)


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_or_indices_differ(family):
    images = {generate(family, seed, index, 96).png_bytes() for seed in (0, 1, 2) for index in (0, 1, 2)}
    assert len(images) == 9
    texts = {(generate(family, seed, 0, 96).question, generate(family, seed, 0, 96).answer) for seed in range(12)}
    assert len(texts) > 3, f"{family}: question/answer barely depend on the seed: {texts}"


@pytest.mark.parametrize("difficulty", tasks.DIFFICULTIES)
@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_renders_inside_the_image(family, image_size, difficulty):
    vocabulary = tasks.answer_vocabulary(family, difficulty)
    for index in range(8):
        example = generate(family, 3, index, image_size, difficulty)
        assert example.meta["difficulty"] == difficulty
        assert example.image.mode == "RGB" and example.image.size == (image_size, image_size)
        assert example.task == family and example.kind in tasks.question_kinds(family)
        assert example.question.strip() and example.question.isascii()
        assert example.answer in vocabulary, f"{example.id}: {example.answer!r} not in the vocabulary"
        assert " " not in example.answer, "answers are one word or number"
        for record in example.meta["texts"]:
            x0, y0, x1, y1 = record["box"]
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size, (example.id, record)


# ---------------------------------------------------------------- answers recoverable from the image


def _bar_heights(example) -> list[float]:
    """Read each bar's height from the pixel column through its centre (bar colour from the baseline up)."""
    pixels, meta = _pixels(example), example.meta
    heights = []
    for bar in meta["bars"]:
        column = pixels[:, (bar["x0"] + bar["x1"] - 1) // 2]
        is_bar = _near(column, meta["bar_color"], 40.0)
        y = meta["baseline"] - 1
        assert is_bar[y], f"{example.id}: no bar pixel just above the baseline for {bar['label']}"
        while y > 0 and is_bar[y - 1]:
            y -= 1
        heights.append((meta["baseline"] - y) / meta["pixels_per_unit"])
    return heights


@pytest.mark.parametrize("image_size, difficulty", [(64, "standard"), (96, "standard"), (96, "easy")])
def test_chart_bar_heights_in_pixels_give_the_answer(image_size, difficulty):
    for index in range(40):
        example = generate("chart", 5, index, image_size, difficulty)
        labels = [bar["label"] for bar in example.meta["bars"]]
        heights = _bar_heights(example)
        read = [int(round(h)) for h in heights]
        assert np.allclose(heights, [bar["value"] for bar in example.meta["bars"]], atol=0.5), (example.id, heights)
        kind, answer = example.kind, example.answer
        if kind == "value":
            (label,) = example.meta["question_entities"]
            assert label in example.question
            assert str(read[labels.index(label)]) == answer
        elif kind == "largest":
            assert labels[int(np.argmax(read))] == answer
        elif kind == "smallest":
            assert labels[int(np.argmin(read))] == answer
        else:
            assert answer == ("up" if read[-1] > read[0] else "down")


def _blobs(example) -> list[dict]:
    """Connected components of each shape colour, with a shape guess from how much of its box it fills."""
    pixels = _pixels(example)
    min_area = (5.0 * example.image.size[0] / 96) ** 2  # a quarter of the smallest shape's bounding box
    found = []
    for color in scene.SHAPE_COLORS:
        labels, count = ndimage.label(_near(pixels, render.COLORS[color], 45.0))
        for k, region in enumerate(ndimage.find_objects(labels), start=1):
            area = int((labels[region] == k).sum())
            if area < min_area:
                continue
            box_area = (region[0].stop - region[0].start) * (region[1].stop - region[1].start)
            fill = area / box_area
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            found.append({"color": color, "shape": shape})
    return found


@pytest.mark.parametrize("image_size, difficulty", [(64, "standard"), (96, "standard"), (96, "easy")])
def test_scene_blob_counts_and_colours_give_the_answer(image_size, difficulty):
    kinds = Counter()
    for index in range(60):
        example = generate("scene", 9, index, image_size, difficulty)
        blobs = _blobs(example)
        drawn = sorted((s["color"], s["shape"]) for s in example.meta["shapes"])
        assert sorted((b["color"], b["shape"]) for b in blobs) == drawn, example.id
        target, kind = example.meta["target"], example.kind
        kinds[kind] += 1
        if kind == "count_color":
            assert str(sum(b["color"] == target["color"] for b in blobs)) == example.answer
        elif kind == "count_shape":
            assert str(sum(b["shape"] == target["shape"] for b in blobs)) == example.answer
        elif kind == "color_of_shape":
            assert [b["color"] for b in blobs if b["shape"] == target["shape"]] == [example.answer]
        else:
            assert str(len(blobs)) == example.answer
    assert set(kinds) == set(scene.KINDS)


def _has_ink(pixels: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = box
    patch = pixels[y0:y1, x0:x1].reshape(-1, 3)
    return float(np.abs(patch - np.median(patch, axis=0)).sum(-1).max()) > 120.0


def _texts(example, role=None) -> list[dict]:
    return [t for t in example.meta["texts"] if role is None or t["role"] == role]


def _check_entities_drawn(example):
    """Each entity the question names is in the question and is drawn (as text, or as an icon/colour/slot)."""
    drawn = {t["text"] for t in example.meta["texts"]}
    drawn |= {o["object"] for o in example.meta.get("objects", [])}
    drawn |= {b[key] for b in example.meta.get("buttons", []) for key in ("color", "position")}
    for entity in example.meta["question_entities"]:
        assert entity in example.question, (example.id, entity)
        assert any(entity == d or entity in d.split() for d in drawn) or any(
            entity == d.lstrip("$") for d in drawn), (example.id, entity, drawn)


@pytest.mark.parametrize("difficulty", tasks.DIFFICULTIES)
@pytest.mark.parametrize("family", ("document", "table", "ui", "map"))
def test_text_answers_are_drawn_inside_the_image(family, difficulty):
    for index in range(40):
        example = generate(family, 4, index, 96, difficulty)
        pixels = _pixels(example)
        _check_entities_drawn(example)
        role = example.meta.get("answer_role")
        if role is None:  # ui colour/position answers: checked by the dedicated test below
            continue
        holders = [t for t in _texts(example, role) if t["text"].lstrip("$x") == example.answer]
        assert holders, (example.id, example.answer, _texts(example, role))
        assert all(_has_ink(pixels, t["box"]) for t in holders), example.id


def test_document_answers_follow_the_drawn_receipt_lines():
    kinds = Counter()
    for index in range(60):
        example = generate("document", 2, index, 96)
        by_row = {}  # receipt lines rebuilt from strings drawn on the same row
        for role in ("item", "quantity", "price"):
            for t in _texts(example, role):
                by_row.setdefault(t["box"][1], {})[role] = t["text"].lstrip("$x")
        lines = {row["item"]: (row["quantity"], row["price"]) for row in by_row.values()}
        (total,) = [int(t["text"].lstrip("$")) for t in _texts(example, "total")]
        assert sum(int(price) for _, price in lines.values()) == total == example.meta["total"]
        entities, kind = example.meta["question_entities"], example.kind
        expected = {
            "total": lambda: str(total),
            "quantity": lambda: lines[entities[0]][0],
            "price": lambda: lines[entities[0]][1],
            "item": lambda: next(item for item, (_, price) in lines.items() if price == entities[0]),
        }[kind]()
        assert example.answer == expected, example.id
        kinds[kind] += 1
    assert min(kinds.values()) >= 8


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _table_from_drawn_text(example) -> dict[tuple[str, str], int]:
    """Rebuild {(row, column): value} from where the header and cell strings were drawn."""
    rows = [(t["text"], _centre(t["box"])[1]) for t in _texts(example, "row")]
    cols = [(t["text"], _centre(t["box"])[0]) for t in _texts(example, "column")]
    table = {}
    for cell in _texts(example, "cell"):
        x, y = _centre(cell["box"])
        row = min(rows, key=lambda r: abs(r[1] - y))[0]
        col = min(cols, key=lambda c: abs(c[1] - x))[0]
        table[(row, col)] = int(cell["text"])
    return table


def test_table_max_answers_follow_the_drawn_numbers():
    kinds = Counter()
    for index in range(60):
        example = generate("table", 6, index, 96)
        table = _table_from_drawn_text(example)
        (entity,) = example.meta["question_entities"] if example.kind != "cell" else (None,)
        if example.kind == "row_max":
            column = {key: v for key, v in table.items() if key[1] == entity}
            assert max(column, key=column.get)[0] == example.answer, example.id
        elif example.kind == "column_max":
            row = {key: v for key, v in table.items() if key[0] == entity}
            assert max(row, key=row.get)[1] == example.answer, example.id
        else:
            assert str(table[tuple(example.meta["question_entities"])]) == example.answer
        kinds[example.kind] += 1
    assert min(kinds.values()) >= 10


def test_table_cell_answer_sits_at_its_row_and_column_headers():
    checked = 0
    for index in range(60):
        example = generate("table", 6, index, 96)
        if example.kind != "cell":
            continue
        row, column = example.meta["question_entities"]
        (row_box,) = [t["box"] for t in _texts(example, "row") if t["text"] == row]
        (col_box,) = [t["box"] for t in _texts(example, "column") if t["text"] == column]
        cells = [t["box"] for t in _texts(example, "cell") if t["text"] == example.answer]
        at = [b for b in cells if abs(_centre(b)[1] - _centre(row_box)[1]) <= 1.5
              and abs(_centre(b)[0] - _centre(col_box)[0]) <= 1.5]
        assert len(at) == 1, (example.id, row, column, example.answer)
        checked += 1
    assert checked >= 10


def test_map_relation_answers_match_room_boxes():
    for index in range(60):
        example = generate("map", 8, index, 96)
        rooms = {room["name"]: room for room in example.meta["rooms"]}
        answer = rooms[example.answer]
        if example.kind == "object_in":
            (obj,) = [o for o in example.meta["objects"] if o["object"] == example.meta["question_entities"][0]]
            cx, cy = _centre(obj["box"])
            x0, y0, x1, y1 = answer["box"]
            assert x0 <= cx <= x1 and y0 <= cy <= y1, example.id
            continue
        source = rooms[example.meta["question_entities"][0]]
        (sx0, sy0, sx1, sy1), (ax0, ay0, ax1, ay1) = source["box"], answer["box"]
        expected = {"left_of": (ax1 == sx0 and ay0 == sy0), "right_of": (ax0 == sx1 and ay0 == sy0),
                    "north_of": (ay1 == sy0 and ax0 == sx0), "south_of": (ay0 == sy1 and ax0 == sx0)}
        assert expected[example.kind], (example.id, example.kind, source, answer)


def test_ui_colour_and_position_answers_match_the_pixels():
    for index in range(60):
        example = generate("ui", 7, index, 96)
        pixels = _pixels(example)
        buttons = example.meta["buttons"]
        target = next(b for b in buttons if b["label"] == example.meta["target"])
        x0, y0, x1, y1 = target["box"]
        inside = pixels[y0 + 3:y1 - 2, x0 + 3:x0 + 6].reshape(-1, 3)  # left edge of the button, clear of the label
        colour = min(ui.BUTTON_COLORS, key=lambda c: np.linalg.norm(np.median(inside, 0) - render.COLORS[c]))
        assert colour == target["color"], example.id
        if example.kind == "color_of":
            assert example.answer == colour
        if example.kind == "position_of":
            axis = 1 if example.meta["layout"] == "vertical" else 0
            order = sorted(buttons, key=lambda b: _centre(b["box"])[axis])
            names = ui.VERTICAL if axis else ui.HORIZONTAL
            slots = list(names) if len(order) == 3 else [names[0], names[2]]
            assert slots[order.index(target)] == example.answer, example.id


# ---------------------------------------------------------------- splits and answer distributions


def test_heldout_seed_streams_are_disjoint_from_train():
    for seed in range(4):
        train = set(split_keys("train", 120, seed=seed))
        for other in range(4):
            assert not train & set(split_keys("heldout", 120, seed=other))
    assert {split_seed("train", s) for s in range(50)}.isdisjoint({split_seed("heldout", s) for s in range(50)})
    train, heldout = make_split("train", 30, image_size=64), make_split("heldout", 30, image_size=64)
    assert not {e.id for e in train} & {e.id for e in heldout}
    assert not {e.png_bytes() for e in train} & {e.png_bytes() for e in heldout}
    assert [e.task for e in train[:6]] == list(FAMILIES)


@pytest.mark.parametrize("difficulty", tasks.DIFFICULTIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_answer_distribution_is_not_degenerate(family, difficulty):
    answers, kinds = Counter(), Counter()
    for index in range(500):
        example = generate(family, 0, index, 48, difficulty)
        answers[example.answer] += 1
        kinds[example.kind] += 1
    top, count = answers.most_common(1)[0]
    assert count / 500 <= 0.5, f"{family}: {top!r} is {count / 5:.0f}% of answers"
    assert set(kinds) == set(tasks.question_kinds(family))
    assert len(answers) >= 5
    assert len(tasks.answer_vocabulary(family, difficulty)) <= 150  # small enough for a tiny model and BPE vocab
    assert set(answers) <= tasks.answer_vocabulary(family, difficulty)


@pytest.mark.parametrize("family", FAMILIES)
def test_easy_answers_are_a_subset_of_standard_answers(family):
    easy, standard = tasks.answer_vocabulary(family, "easy"), tasks.answer_vocabulary(family, "standard")
    assert easy <= standard
    assert generate(family, 0, 0, 96, "easy").id.startswith(f"{family}-easy-")
    assert generate(family, 0, 0, 96, "easy").png_bytes() == generate(family, 0, 0, 96, tasks.EASY).png_bytes()


# ---------------------------------------------------------------- scorer, conversation view, corpus, fonts


def test_exact_match_normalises_only_whitespace_case_and_trailing_punctuation():
    assert tasks.exact_match("  Red. ", "red")
    assert tasks.exact_match("TOP!", "top")
    assert tasks.exact_match("Q3", "q3")
    assert tasks.exact_match("new\t york", "New York")
    assert not tasks.exact_match("17", "7")
    assert not tasks.exact_match("the red", "red")
    assert not tasks.exact_match(".red", "red")
    assert not tasks.exact_match("", "red")


def test_to_conversation_uses_the_official_placeholder_and_roles():
    example = generate("ui", 0, 0, 64)
    user, assistant = tasks.to_conversation(example)
    assert user["role"] == "User" and assistant["role"] == "Assistant"
    assert user["content"] == "<image_placeholder>" + example.question
    assert user["content"].count(tasks.IMAGE_PLACEHOLDER) == len(user["images"]) == 1
    assert user["images"][0] is example.image
    assert assistant == {"role": "Assistant", "content": example.answer, "images": []}


def test_text_corpus_is_deterministic_and_about_the_same_world():
    corpus = tasks.text_corpus(60, seed=3)
    assert corpus == tasks.text_corpus(60, seed=3)
    assert corpus[:20] == tasks.text_corpus(20, seed=3)
    assert corpus != tasks.text_corpus(60, seed=4)
    assert all(p.strip() and p.isascii() for p in corpus)
    words = set(" ".join(corpus).replace(",", " ").replace(".", " ").replace(";", " ").split())
    for vocabulary_word in ("receipt", "chart", "table", "button", "north", "triangle"):
        assert any(vocabulary_word in w for w in words), vocabulary_word


def test_pixel_face_fallback_without_freetype(monkeypatch):
    monkeypatch.setattr(render, "freetype_available", lambda: False)
    for family in ("document", "chart", "table", "ui", "map"):
        example = generate(family, 1, 0, 96)
        assert example.meta["face"] == "pixel"
        assert example.meta["texts"]


@pytest.mark.parametrize("call, message", [
    (lambda: generate("maps", 0, 0), "unknown task family 'maps'"),
    (lambda: generate("chart", -1, 0), "seed must be"),
    (lambda: generate("chart", 0, 0, 32), "image_size must be"),
    (lambda: make_split("test", 4), "split must be one of"),
    (lambda: tasks.answer_vocabulary("tables"), "unknown task family"),
    (lambda: tasks.text_corpus(-2), "n must be"),
    (lambda: generate("chart", 0, 0, 96, "hard"), "difficulty must be one of"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_contact_sheet_renders(tmp_path):
    from dsvl_jax.tasks.contact_sheet import main
    out = tmp_path / "sheet.png"
    main(["--image-size", "64", "--per-family", "2", "--out", str(out)])
    assert out.stat().st_size > 10_000


def test_one_thousand_examples_at_96px_take_well_under_ten_seconds():
    start = time.perf_counter()
    examples = make_split("train", 1000, image_size=96)
    elapsed = time.perf_counter() - start
    assert len(examples) == 1000
    assert elapsed < 10.0, f"1000 examples took {elapsed:.1f} s"
