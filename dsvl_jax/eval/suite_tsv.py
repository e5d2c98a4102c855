"""The embedded suite's held-out split as an MMBench-style TSV, so that `dsvl-eval --format mmbench` (base64
images, options, circular evaluation, the answer matcher) runs end to end on data anyone can regenerate:

    python -m dsvl_jax.eval.suite_tsv suite_heldout.tsv --n 60
    dsvl-eval --ckpt DIR --format mmbench --data suite_heldout.tsv

Each example's short answer becomes one of up to four options; the others are answers the same family can
give, of the same kind (numbers for a number, words for a word), drawn from a seed per example, and the
right one lands on a letter drawn the same way. category = the task family.
"""
from __future__ import annotations

import argparse
import base64
import csv
import os
import sys
from typing import Optional

import numpy as np

from dsvl_jax import tasks
from dsvl_jax.eval.formats import LETTERS

COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).lstrip("-").isdigit()


def options_for(example: tasks.Example, seed: int) -> tuple[dict, str]:
    """(letter → option text, the right letter) for one example, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    pool = sorted(a for a in tasks.answer_vocabulary(example.task)
                  if _numeric(a) == _numeric(example.answer) and not tasks.exact_match(a, example.answer))
    picked = [pool[i] for i in rng.permutation(len(pool))[:len(LETTERS) - 1]]
    texts = picked + [example.answer]
    order = rng.permutation(len(texts))
    letters = LETTERS[:len(texts)]
    options = {letters[i]: texts[j] for i, j in enumerate(order)}
    return options, letters[int(np.flatnonzero(order == len(texts) - 1)[0])]


def write(path: str, n: int = 60, seed: int = 0, split: str = "heldout") -> int:
    """Write `n` examples of `split` to `path`; returns the number written."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(COLUMNS)
        count = 0
        for i, e in enumerate(tasks.iter_split(split, n, seed=seed)):
            options, right = options_for(e, seed * 1_000_003 + i)
            cells = [options.get(k, "") for k in LETTERS]
            out.writerow([i, e.question, "", *cells, right, e.task, base64.b64encode(e.png_bytes()).decode()])
            count += 1
    return count


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsvl_jax.eval.suite_tsv", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the TSV to write")
    ap.add_argument("--n", type=int, default=60, help="number of examples (default 60, 10 per family)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (default 0, the demo's)")
    ap.add_argument("--split", choices=tasks.SPLITS, default="heldout")
    args = ap.parse_args(argv)
    if args.n < 1:
        print(f"suite_tsv: error: --n {args.n}: must be at least 1", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        print(f"suite_tsv: error: {args.out}: folder {folder} does not exist", file=sys.stderr)
        return 2
    print(f"wrote {write(args.out, args.n, args.seed, args.split)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
