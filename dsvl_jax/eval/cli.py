"""`dsvl-eval`: score a checkpoint on a benchmark file with batched greedy generation.

    dsvl-eval --ckpt DIR --format mmbench --data MMBench_DEV_EN.tsv [--limit N] [--batch 8] [--out results.json]
    dsvl-eval --ckpt DIR --format vqa|docvqa|chartqa|pope --data questions.jsonl
    dsvl-eval --ckpt DIR --format suite --data heldout:60          # the embedded task suite

Prints a per-category table and writes every prediction with its score, the per-category and overall
scores and the skipped rows (with the reason) as JSON. Formats and metrics: `dsvl_jax.eval.formats`,
`dsvl_jax.eval.metrics`. Errors in the arguments or files are one line on stderr and exit status 2;
a bad row is a counted skip, never a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, TextIO

from dsvl_jax.errors import UsageError, require_at_least_one
from dsvl_jax.eval import formats, runner, scoring
from dsvl_jax.serve.model import LoadError, load

EXIT_BAD_INPUT = 2
DEFAULT_MAX_NEW = formats.DEFAULT_MAX_NEW


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the same shape as every other error here
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dsvl-eval", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder (config, weights, tokenizer)")
    ap.add_argument("--data", required=True, help=f"the benchmark file (suite: {formats.SUITE_SPEC_HELP})")
    ap.add_argument("--format", required=True, choices=formats.FORMATS, help="layout and metric of --data")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    ap.add_argument("--batch", type=int, default=8, help="prompts per generation batch (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="answer length limit (default per format: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_NEW.items()) + ")")
    ap.add_argument("--max-images", type=int, default=None,
                    help="skip rows with more images than this (default: as many as the context holds)")
    ap.add_argument("--system-prompt", default=None,
                    help="the system text in front of each prompt (default: DeepSeek-VL's; '' for none)")
    ap.add_argument("--out", default=None, help="write predictions and scores to this JSON file")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    ap.add_argument("--mesh", default="auto", help="auto (all devices when several), none, or DATA,FSDP,TENSOR")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _check_args(args) -> None:
    require_at_least_one(args, ("limit", "batch", "max_new_tokens", "max_images"))
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise UsageError(f"--out {args.out}: folder {folder} does not exist")


def _unique(skips) -> list:
    """One entry per (row, reason): the rotations of an MMBench question fail together."""
    seen, out = set(), []
    for s in skips:
        if (s.row, s.reason) not in seen:
            seen.add((s.row, s.reason))
            out.append(s.as_dict())
    return out


def run(args, out: TextIO, err: TextIO) -> dict:
    _check_args(args)
    try:
        items, skips = formats.read(args.format, args.data, args.limit)
    except formats.DataError as e:
        raise UsageError(str(e)) from None
    if not items:
        raise UsageError(f"--data {args.data}: no usable rows ({len(skips)} skipped"
                         + (f"; first: {skips[0].row}: {skips[0].reason})" if skips else ")"))
    try:
        vlm, processor = load(args.ckpt, dtype=args.dtype, mesh=args.mesh)
    except LoadError as e:
        raise UsageError(str(e)) from None
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW[args.format]
    counts = formats.describe(items)
    print(f"dsvl-eval: {counts['questions']} questions ({counts['prompts']} prompts) from {args.data}, "
          f"batch {args.batch}" + (f", mesh {dict(vlm.mesh.shape)}" if vlm.mesh is not None else ""), file=err)
    t0 = time.perf_counter()
    answers, bad, gen_s = runner.answer_all(vlm, processor, items, batch=args.batch, max_new_tokens=max_new,
                                           max_images=args.max_images, progress=not args.no_progress, err=err,
                                           system_prompt=args.system_prompt)
    summary = scoring.summarize(args.format, items, answers)
    skipped = _unique(skips + bad)
    print(scoring.table(summary), file=out)
    if skipped:
        print(f"skipped {len(skipped)} row(s); first: {skipped[0]['row']}: {skipped[0]['reason']}", file=out)
    result = {"format": args.format, "data": args.data, "ckpt": args.ckpt, "metric": summary["metric"],
              "overall": summary["overall"], "questions": summary["questions"],
              "per_category": summary["per_category"], "skipped": skipped,
              "seconds": {"total": time.perf_counter() - t0, "generation": gen_s},
              "settings": {"batch": args.batch, "max_new_tokens": max_new, "limit": args.limit,
                           "system_prompt": processor.system_prompt if args.system_prompt is None
                           else args.system_prompt},
              "predictions": summary["records"]}
    for extra in ("pope", "first_rotation_accuracy"):
        if extra in summary:
            result[extra] = summary[extra]
    result = scoring.json_safe(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
        print(f"wrote {args.out}", file=err)
    return result


def main(argv: Optional[list] = None, out: TextIO = None, err: TextIO = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        run(build_parser().parse_args(argv), out, err)
        return 0
    except UsageError as e:
        print(f"dsvl-eval: error: {e}", file=err)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
