"""Predictions → scores: one number per prompt, one per question (group), per category and overall.

A question counts as right only when every prompt of its group is (MMBench's circular evaluation: all
rotations of the options); other formats have one prompt per question. Overall is the mean over
questions, except for the suite, where it is the mean over task families (as `make demo` reports it).
POPE adds its yes/no summary (precision, recall, F1, yes ratio); MMBench adds the score of the first
rotation alone (the non-circular number).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

from dsvl_jax import tasks
from dsvl_jax.eval import metrics
from dsvl_jax.eval.formats import Item

METRIC_NAMES = {"mmbench": "circular accuracy", "vqa": "VQAv2 accuracy", "docvqa": "ANLS",
                "chartqa": "relaxed accuracy", "pope": "accuracy", "suite": "exact match"}


def score_item(fmt: str, item: Item, prediction: str) -> tuple[float, object]:
    """(score in [0, 1], what was read from the prediction: a letter, yes/no, or None)."""
    ref = item.reference
    if fmt == "mmbench":
        choice = metrics.mmbench_choice(prediction, ref["options"])
        return float(choice == ref["answer"]), choice
    if fmt == "vqa":
        return metrics.vqa_accuracy(prediction, ref["answers"]), None
    if fmt == "docvqa":
        return metrics.anls(prediction, ref["answers"]), None
    if fmt == "chartqa":
        return metrics.relaxed_accuracy(prediction, ref["answer"]), None
    if fmt == "pope":
        said = metrics.pope_answer(prediction)
        return float(said == ref["label"]), said
    if fmt == "suite":
        return float(tasks.exact_match(prediction, ref["answer"])), None
    raise ValueError(f"unknown format {fmt!r}")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(fmt: str, items: Sequence[Item], predictions: Mapping[str, str]) -> dict:
    """Scores of the items that have a prediction. A question with a prompt missing (skipped) is left out."""
    records = []
    groups: "OrderedDict[str, list]" = OrderedDict()
    for item in items:
        if item.id not in predictions:
            groups.setdefault(item.group, []).append(None)
            continue
        score, read = score_item(fmt, item, predictions[item.id])
        record = {"id": item.id, "group": item.group, "category": item.category, "question": item.question,
                  "prediction": predictions[item.id], "reference": item.reference, "score": score}
        if read is not None or fmt == "mmbench":
            record["read"] = read
        records.append(record)
        groups.setdefault(item.group, []).append(record)

    per_category: dict = OrderedDict()
    for members in groups.values():
        if any(m is None for m in members):
            continue
        per_category.setdefault(members[0]["category"], []).append(min(m["score"] for m in members))
    categories = {c: {"score": _mean(v), "n": len(v)} for c, v in per_category.items()}
    all_groups = [s for v in per_category.values() for s in v]
    overall = _mean([c["score"] for c in categories.values()]) if fmt == "suite" else _mean(all_groups)
    out = {"metric": METRIC_NAMES[fmt], "overall": overall, "questions": len(all_groups),
           "per_category": categories, "records": records}
    if fmt == "pope":
        out["pope"] = metrics.binary_scores([r["read"] for r in records], [r["reference"]["label"] for r in records])
    if fmt == "mmbench":
        first = [r["score"] for r in records if r["reference"]["rotation"] == 0]
        out["first_rotation_accuracy"] = _mean(first)
    return out


def json_safe(x):
    """NaN / infinity → None, so the JSON written is standard (a category with no questions scores NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def table(summary: dict) -> str:
    """The per-category table printed at the end of a run."""
    cats = summary["per_category"]
    width = max([len("mean of categories")] + [len(c) for c in cats]) + 2
    head = f"{'category'.ljust(width)}{'n':>6}  {summary['metric']}"
    lines = [head, "-" * len(head)]
    for c, v in cats.items():
        lines.append(f"{c.ljust(width)}{v['n']:>6}  {100 * v['score']:6.1f}%")
    lines.append("-" * len(head))
    label = "mean of categories" if summary["metric"] == METRIC_NAMES["suite"] else "overall"
    lines.append(f"{label.ljust(width)}{summary['questions']:>6}  {100 * summary['overall']:6.1f}%")
    if "first_rotation_accuracy" in summary:
        lines.append(f"(first rotation only: {100 * summary['first_rotation_accuracy']:.1f}%)")
    if "pope" in summary:
        p = summary["pope"]
        lines.append(f"precision {100 * p['precision']:.1f}%  recall {100 * p['recall']:.1f}%  "
                     f"F1 {100 * p['f1']:.1f}%  yes ratio {100 * p['yes_ratio']:.1f}%")
    return "\n".join(lines)
