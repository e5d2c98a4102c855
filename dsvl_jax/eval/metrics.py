"""Benchmark metrics as plain functions of (prediction, reference), each following its benchmark's definition.

- `vqa_accuracy`: VQAv2 (Antol et al. 2015): answers normalised (`vqa_normalize`), then min(1, matches / 3)
  averaged over the 10 leave-one-out subsets of the human answers.
- `anls`: DocVQA's Average Normalized Levenshtein Similarity (Biten et al. 2019), threshold 0.5.
- `relaxed_accuracy`: ChartQA (Masry et al. 2022): numbers within 5 % of a non-zero target, else exact match.
- `mmbench_choice`: MMBench's answer matcher (Liu et al. 2023): a lone option letter, else the one option
  whose text occurs in the answer.
- `pope_answer` / `binary_scores`: POPE (Li et al. 2023): yes/no read from the first sentence; accuracy,
  precision, recall, F1 and the yes ratio with "yes" as the positive class.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from dsvl_jax.eval.vqa_normalize import normalize as vqa_normalize

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


# ---- VQAv2 --------------------------------------------------------------------------------------
def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """Mean over each human answer left out of min(1, #other answers equal to pred / 3).

    With the usual 10 answers this is min(1, matches / 3) smoothed: 3 or more matches give 1.0, two give
    0.6, one 0.3. Both sides are normalised (the official script skips that when all 10 human answers
    agree, since the released answers are normalised already; normalising always gives the same result on
    them and the right one on raw answers)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    p = vqa_normalize(pred)
    truth = [vqa_normalize(a) for a in answers]
    scores = []
    for i in range(len(truth)):
        others = truth[:i] + truth[i + 1:]
        scores.append(min(1.0, sum(a == p for a in others) / 3.0))
    return sum(scores) / len(scores)


# ---- DocVQA -------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions cost 1), one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def anls(pred: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """max over answers of 1 - NL, where NL = edit distance / longer length; 0 when NL ≥ threshold.
    Case and runs of whitespace are ignored (the DocVQA evaluation lower-cases and strips)."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    p = _anls_text(pred)
    best = 0.0
    for a in answers:
        a = _anls_text(a)
        longest = max(len(a), len(p))
        nl = levenshtein(p, a) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ---- ChartQA ------------------------------------------------------------------------------------
def _as_number(text: str) -> Optional[float]:
    """"12.5" → 12.5, "40%" → 0.4 (a percentage is its fraction, as ChartQA's evaluation reads it)."""
    text = text.strip()
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(pred: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    """1.0 when |pred - target| / |target| ≤ 5 % for a numeric, non-zero target, else when the strings are
    equal ignoring case and surrounding spaces; 0.0 otherwise."""
    pred, target = str(pred).strip(), str(target).strip()
    p, t = _as_number(pred), _as_number(target)
    if p is not None and t:  # a zero target has no relative error: it falls to the string comparison
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(pred.lower() == target.lower())


# ---- MMBench ------------------------------------------------------------------------------------
_MMBENCH_SEPARATORS = ".()[],:;!*#{}"


def mmbench_choice(text: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter an answer picks, or None when it cannot be told.

    1. Punctuation `.()[],:;!*#{}` becomes spaces; if exactly one of the option letters stands alone as a
       word, that letter ("B", "(B) cat", "Answer: B.").
    2. Otherwise (no letter, or several), if exactly one option's text occurs in the answer
       (case-insensitive), that option.
    Anything else is None: MMBench then asks an LLM, which we do not."""
    text = str(text)
    spaced = text
    for ch in _MMBENCH_SEPARATORS:
        spaced = spaced.replace(ch, " ")
    words = set(spaced.split())
    letters = [k for k in options if k in words]
    if len(letters) == 1:
        return letters[0]
    lowered = text.lower()
    found = [k for k, v in options.items() if str(v).strip() and str(v).lower() in lowered]
    return found[0] if len(found) == 1 else None


# ---- POPE ---------------------------------------------------------------------------------------
def pope_answer(text: str) -> str:
    """"yes" or "no" as POPE reads a free answer: in its first sentence (up to the first period, commas
    removed), any of the words "no", "No", "not" means no; everything else means yes."""
    first = str(text).split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_scores(preds: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's summary over yes/no predictions and labels, "yes" the positive class."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(preds, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else float("nan"), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else float("nan"), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
