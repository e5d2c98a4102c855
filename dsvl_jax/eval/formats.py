"""Benchmark files → `Item`s (one prompt each) and `Skip`s (a bad row and why), per format.

- mmbench: the MMBench TSV (index, question, hint, A-D, answer, category, image as base64; an image
  field holding another row's index reuses that row's image, as the released TSVs do). Each question
  becomes one item per rotation of its options (circular evaluation); they share a `group`.
- vqa / docvqa / chartqa / pope: JSONL, one object per line with "question", "image" (a path relative to
  the file, or a list of them) and the reference: "answers" (a list of strings, or VQAv2's list of
  {"answer": ...}) for vqa and docvqa, "answer" (or "label") for chartqa and pope (yes / no).
  Optional: "question_id" / "id", and "category" (vqa also reads "answer_type").
- suite: the embedded task suite (`dsvl_jax.tasks`); `--data heldout[:N[:SEED]]` instead of a file (options
  such as `:families=chart,scene` choose the split's other arguments: `parse_suite_spec`).

A row that cannot be used (missing field, bad JSON or base64, answer not among the options) is a
`Skip`; a file that cannot be read at all raises `DataError` naming it.
"""
from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import json
import os
import re
from typing import Any, Optional

from dsvl_jax import tasks
from dsvl_jax.tasks.suite import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")
FORMATS = ("mmbench", "vqa", "docvqa", "chartqa", "pope", "suite")
# answer length limit per format, unless asked otherwise (dsvl-eval --max-new-tokens, a benchmark's max_new_tokens)
DEFAULT_MAX_NEW = {"mmbench": 16, "pope": 8, "vqa": 16, "chartqa": 16, "docvqa": 32, "suite": 16}


class DataError(ValueError):
    """A data file that cannot be read at all (missing, no header, wrong columns)."""


@dataclasses.dataclass
class Item:
    """One prompt to answer: the question text asked (without image placeholders), its images and what
    scoring needs. Items of one `group` are scored together (the rotations of an MMBench question)."""

    id: str
    group: str
    category: str
    question: str
    images: list  # sources the Processor reads: paths, bytes, PIL images
    reference: dict
    row: str  # where it came from, for skip reasons: "file.tsv row 3", "file.jsonl line 7"


@dataclasses.dataclass
class Skip:
    row: str
    reason: str

    def as_dict(self) -> dict:
        return {"row": self.row, "reason": self.reason}


class _RowError(ValueError):
    pass


def read(fmt: str, data: str, limit: Optional[int] = None) -> tuple[list[Item], list[Skip]]:
    """Items and skips of `data` in format `fmt`; `limit` counts questions (groups), not rotations."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "suite":
        return read_suite(data, limit)
    if not os.path.isfile(data):
        raise DataError(f"--data {data}: no such file")
    if fmt == "mmbench":
        return read_mmbench(data, limit)
    return read_jsonl(data, fmt, limit)


# ---- MMBench TSV --------------------------------------------------------------------------------
def _missing(value: Optional[str]) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def decode_base64_image(text: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _RowError(f"image is not valid base64 ({e})") from None
    if not data:
        raise _RowError("image is empty")
    return data


def choice_prompt(question: str, options: dict, hint: Optional[str]) -> str:
    lines = ([hint.strip()] if hint else []) + [question.strip()]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines + [CHOICE_ANSWER])


def rotations(options: dict, answer: str) -> list[tuple[dict, str]]:
    """Circular evaluation: option texts shifted by 0..k-1 places over the same letters, with the letter
    the right answer moves to. Rotation 0 is the question as given."""
    letters, texts = list(options), list(options.values())
    k, right = len(letters), letters.index(answer)
    return [({letters[i]: texts[(i + r) % k] for i in range(k)}, letters[(right - r) % k]) for r in range(k)]


def read_mmbench(path: str, limit: Optional[int] = None) -> tuple[list[Item], list[Skip]]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # base64 images are long fields
    name = os.path.basename(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as a TSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    need = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in header]
    if need:
        raise DataError(f"{path}: missing column(s) {need} (an MMBench TSV has index, question, hint, A-D, answer, "
                        f"category, image)")
    by_index = {r["index"]: r["image"] for r in rows if not _missing(r.get("index"))}
    items, skips, groups = [], [], 0
    for n, r in enumerate(rows, 1):
        if limit is not None and groups >= limit:
            break
        where = f"{name} row {n}"
        try:
            for field in ("index", "question", "answer", "image"):
                if _missing(r.get(field)):
                    raise _RowError(f"no {field!r}")
            image = r["image"].strip()
            if len(image) <= 64 and image in by_index and by_index[image].strip() != image:
                image = by_index[image].strip()  # a reference to another row's image
            data = decode_base64_image(image)
            options = {k: r[k].strip() for k in LETTERS if not _missing(r.get(k))}
            if len(options) < 2:
                raise _RowError(f"{len(options)} option(s); a choice needs at least 2")
            answer = r["answer"].strip()
            if answer not in options:
                raise _RowError(f"answer {answer!r} is not one of the options {list(options)}")
        except _RowError as e:
            skips.append(Skip(where, str(e)))
            continue
        groups += 1
        hint = None if _missing(r.get("hint")) else r["hint"]
        category = "all" if _missing(r.get("category")) else r["category"].strip()
        for k, (opts, right) in enumerate(rotations(options, answer)):
            items.append(Item(f"{r['index']}/r{k}", r["index"], category, choice_prompt(r["question"], opts, hint),
                              [data], {"options": opts, "answer": right, "rotation": k}, where))
    return items, skips


# ---- JSONL formats ------------------------------------------------------------------------------
def _string(obj: dict, *keys: str) -> str:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise _RowError(f"no {keys[0]!r}" if len(keys) == 1 else f"none of {list(keys)}")


def _answers(obj: dict) -> list[str]:
    raw = obj.get("answers")
    if raw is None and obj.get("answer") is not None:
        raw = [obj["answer"]]
    if not isinstance(raw, list) or not raw:
        raise _RowError("no 'answers' (a non-empty list)")
    out = []
    for a in raw:
        a = a.get("answer") if isinstance(a, dict) else a  # VQAv2 annotations: [{"answer": ...}, ...]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str):
            raise _RowError(f"an answer is {type(a).__name__}, not a string")
        out.append(a)
    return out


def _images(obj: dict, folder: str) -> list[str]:
    raw = obj.get("image", obj.get("image_path"))
    paths = raw if isinstance(raw, list) else [raw]
    if raw is None or not paths or not all(isinstance(p, str) and p for p in paths):
        raise _RowError("no 'image' (a path or a list of paths)")
    return [p if os.path.isabs(p) else os.path.join(folder, p) for p in paths]


def _jsonl_item(fmt: str, obj: dict, folder: str, n: int, where: str) -> Item:
    question = _string(obj, "question")
    images = _images(obj, folder)
    qid = str(obj.get("question_id", obj.get("id", n)))
    category = obj.get("category", obj.get("answer_type") if fmt == "vqa" else None)
    category = str(category) if category not in (None, "") else "all"
    if fmt in ("vqa", "docvqa"):
        reference = {"answers": _answers(obj)}
    elif fmt == "chartqa":
        reference = {"answer": _string(obj, "answer", "label")}
    else:  # pope
        label = _string(obj, "answer", "label").lower()
        if label not in ("yes", "no"):
            raise _RowError(f"answer {label!r}: POPE labels are yes or no")
        reference = {"label": label}
    return Item(qid, qid, category, f"{question}\n{SHORT_ANSWER}", images, reference, where)


def read_jsonl(path: str, fmt: str, limit: Optional[int] = None) -> tuple[list[Item], list[Skip]]:
    name, folder = os.path.basename(path), os.path.dirname(os.path.abspath(path))
    items, skips = [], []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{name} line {n}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise _RowError(f"expected a JSON object, got {type(obj).__name__}")
                items.append(_jsonl_item(fmt, obj, folder, n, where))
            except json.JSONDecodeError as e:
                skips.append(Skip(where, f"invalid JSON ({e.msg} at column {e.colno})"))
            except _RowError as e:
                skips.append(Skip(where, str(e)))
    return items, skips


# ---- the embedded suite -------------------------------------------------------------------------
_SUITE_SPEC = re.compile(r"^(train|heldout)(?::(\d+))?(?::(\d+))?((?::[a-z_]+=[^:]*)*)$")
SUITE_DEFAULT_N = 60
SUITE_SPEC_HELP = "heldout[:N[:SEED]][:families=A,B][:image_size=PX][:difficulty=D] (or train...)"


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """Which examples of the suite: `tasks.make_split(split, n, families, image_size, seed, difficulty)`."""

    split: str
    n: int
    seed: int
    families: tuple = tasks.FAMILIES
    image_size: int = 96
    difficulty: str = "standard"


def parse_suite_spec(spec: str) -> SuiteSpec:
    """"heldout" / "heldout:N" / "heldout:N:SEED" (or train), then optional ":key=value" parts that name
    the split's other arguments (e.g. a demo run on some families or another image size):
    "heldout:300:0:families=document,chart:image_size=128:difficulty=easy"."""
    m = _SUITE_SPEC.match(spec.strip())
    if not m:
        raise DataError(f"--data {spec!r}: for --format suite, expected {SUITE_SPEC_HELP}")
    out = SuiteSpec(m.group(1), int(m.group(2) or SUITE_DEFAULT_N), int(m.group(3) or 0))
    for part in filter(None, m.group(4).split(":")):
        key, value = part.split("=", 1)
        if key == "families":
            families = tuple(f.strip() for f in value.split(",") if f.strip())
            unknown = [f for f in families if f not in tasks.FAMILIES]
            if unknown or not families:
                raise DataError(f"--data {spec!r}: families {unknown or '(none)'} unknown; known: "
                                f"{','.join(tasks.FAMILIES)}")
            out = dataclasses.replace(out, families=families)
        elif key == "image_size":
            if not value.isdigit() or not MIN_IMAGE_SIZE <= int(value) <= MAX_IMAGE_SIZE:
                raise DataError(f"--data {spec!r}: image_size={value}: expected an integer in "
                                f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
            out = dataclasses.replace(out, image_size=int(value))
        elif key == "difficulty":
            if value not in tasks.DIFFICULTIES:
                raise DataError(f"--data {spec!r}: difficulty={value}: expected one of {sorted(tasks.DIFFICULTIES)}")
            out = dataclasses.replace(out, difficulty=value)
        else:
            raise DataError(f"--data {spec!r}: unknown option {key!r}; expected families, image_size, difficulty")
    return out


def read_suite(spec: str, limit: Optional[int] = None) -> tuple[list[Item], list[Skip]]:
    s = parse_suite_spec(spec)
    n = s.n if limit is None else min(s.n, limit)
    examples = tasks.iter_split(s.split, n, s.families, s.image_size, s.seed, s.difficulty)
    items = [Item(e.id, e.id, e.task, e.question, [e.image], {"answer": e.answer}, f"{s.split} example {i}")
             for i, e in enumerate(examples)]
    return items, []


def describe(items: list[Item]) -> dict[str, Any]:
    """Counts for the log line: questions, prompts, categories."""
    return {"questions": len({i.group for i in items}), "prompts": len(items),
            "categories": len({i.category for i in items})}

