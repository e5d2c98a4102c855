"""Exact-match accuracy per task family: greedy KV-cache generation (`VLM.generate`) on a held-out split."""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Sequence

import numpy as np

from dsvl_jax import tasks
from dsvl_jax.data.transforms import task_tag_prefix
from dsvl_jax.processing.processor import Processor
from dsvl_jax.runtime import VLM


def prompt(example: tasks.Example, task_tag: bool = False) -> list[dict]:
    """The request with an empty assistant turn: what the model is asked to complete. `task_tag`: the
    family's tag in front of the instruction, as training put it (`data.transforms.task_tag_prefix`)."""
    tag = task_tag_prefix(example.task) if task_tag else ""
    return [{"role": "User", "content": f"{tag}{tasks.IMAGE_PLACEHOLDER}{example.question}",
             "images": [example.image]},
            {"role": "Assistant", "content": ""}]


@dataclasses.dataclass
class Scores:
    per_family: dict  # family -> accuracy in [0, 1]
    counts: dict  # family -> number of examples
    predictions: list  # (example id, family, prediction, answer, correct)
    seconds: float

    @property
    def mean(self) -> float:
        """Mean over families (each family weighs the same, as the issue's target reads)."""
        return float(np.mean(list(self.per_family.values()))) if self.per_family else float("nan")

    def as_dict(self) -> dict:
        return {"mean": self.mean, "per_family": self.per_family, "counts": self.counts, "seconds": self.seconds}


def answer(vlm: VLM, processor: Processor, examples: Sequence[tasks.Example], *, max_new_tokens: int = 6,
           batch_size: int = 32, task_tag: bool = False) -> list[str]:
    """Greedy answers, in batches of a fixed size (the last one padded with repeats: one compiled program)."""
    tok = processor.tokenizer
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        batch = processor([prompt(e, task_tag) for e in chunk])
        new = vlm.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], high_res_pixel_values=batch.get("high_res_pixel_values"),
                           max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        for row in np.asarray(new)[:real]:
            ids = row.tolist()
            if tok.eos_id in ids:
                ids = ids[:ids.index(tok.eos_id)]
            out.append(tok.decode(ids).strip())
    return out


def score(vlm: VLM, processor: Processor, examples: Sequence[tasks.Example], **kw) -> Scores:
    t0 = time.perf_counter()
    preds = answer(vlm, processor, examples, **kw)
    return score_predictions(examples, preds, time.perf_counter() - t0)


def prior_baseline(examples: Sequence[tasks.Example], prior_answers: dict) -> Scores:
    """What answering without the image scores: each request gets the most common train answer of its
    (family, question kind). A model that beats this reads the picture."""
    return score_predictions(examples, [prior_answers.get((e.task, e.kind), "") for e in examples], 0.0)


def with_shuffled_images(examples: Sequence[tasks.Example], seed: int = 0) -> list[tasks.Example]:
    """The same requests, each shown another request's image (a derangement within each family, so that the
    picture keeps its family's look but no longer holds the answer). A model that reads the image falls to
    about the no-image guess here; one that ignores it scores the same as with the real images."""
    rng = np.random.default_rng(seed)
    out = list(examples)
    by_family = defaultdict(list)
    for i, e in enumerate(examples):
        by_family[e.task].append(i)
    for idx in by_family.values():
        if len(idx) < 2:
            continue
        shift = rng.permutation(len(idx))
        # a cyclic shift of a random order: nobody keeps their own image
        for a, b in zip(shift, np.roll(shift, 1)):
            out[idx[a]] = dataclasses.replace(examples[idx[a]], image=examples[idx[b]].image)
    return out


def answer_budget(tokenizer, answers: Sequence[str]) -> int:
    """Tokens greedy decoding needs for the longest answer, its end-of-sequence token included, with or
    without a leading space: scoring never cuts an answer short."""
    longest = max((len(tokenizer.encode(t, add_bos=False)) for a in answers for t in (a, " " + a)), default=1)
    return longest + 1


def score_predictions(examples: Sequence[tasks.Example], preds: Sequence[str], seconds: float) -> Scores:
    hits, counts = defaultdict(int), defaultdict(int)
    rows = []
    for e, p in zip(examples, preds):
        ok = tasks.exact_match(p, e.answer)
        hits[e.task] += ok
        counts[e.task] += 1
        rows.append((e.id, e.task, p, e.answer, ok))
    families = [f for f in tasks.FAMILIES if f in counts]
    return Scores({f: hits[f] / counts[f] for f in families}, {f: counts[f] for f in families}, rows, seconds)


def table(columns: dict[str, Scores]) -> str:
    """A text table: one row per family, one column per named score set, then the mean over families."""
    names = list(columns)
    families = [f for f in tasks.FAMILIES if any(f in s.per_family for s in columns.values())]
    width = max(10, *(len(n) + 2 for n in names))
    lines = ["family".ljust(10) + "".join(n.rjust(width) for n in names)]
    lines.append("-" * len(lines[0]))
    for f in families:
        cells = [f"{100 * columns[n].per_family[f]:.1f}%" if f in columns[n].per_family else "-" for n in names]
        lines.append(f.ljust(10) + "".join(c.rjust(width) for c in cells))
    lines.append("-" * len(lines[0]))
    lines.append("mean".ljust(10) + "".join(f"{100 * columns[n].mean:.1f}%".rjust(width) for n in names))
    return "\n".join(lines)
