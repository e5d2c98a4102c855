"""Flags of `python -m dsvl_jax.demo` (what `make demo` runs)."""
from __future__ import annotations

import argparse
import dataclasses

from dsvl_jax import tasks
from dsvl_jax.demo.run import Settings, parse_steps, run

# ~1-2 minutes: every step of the demo on a few records with a shallower model (compiling dominates).
QUICK = dict(steps=(2, 2, 4), n_train=48, n_text=24, n_eval=12, batch=8, eval_batch=12, layers=(2, 1, 1))


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m dsvl_jax.demo", description=__doc__.splitlines()[0] + " "
                                + "Train a tiny hybrid DeepSeek-VL on the embedded task suite and score it.")
    p.add_argument("--workdir", default=d.workdir, help="where data, checkpoints, logs and the export go "
                   "(an earlier run there is replaced)")
    p.add_argument("--steps", default=",".join(map(str, d.steps)),
                   help="training steps: a total (split 1:1:6 over stages 1, 2, 3) or 'a,b,c' per stage")
    p.add_argument("--families", default=",".join(d.families),
                   help=f"comma-separated task families, from {','.join(tasks.FAMILIES)}")
    p.add_argument("--stage0", type=int, default=d.stage0, help="steps of stage 0 (every part trained from random "
                   "weights) before the paper's stages 1-3")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=d.stream,
                   help="draw multimodal training records on demand (never the same image twice) instead of "
                   "reading the written pool")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices")
    p.add_argument("--lr-mult", default=",".join(f"{k}={v}" for k, v in d.lr_mult),
                   help="per-group learning-rate factors, e.g. 'sam=2,siglip=2' (groups: adaptor, llm, siglip, sam)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--image-size", type=int, default=d.image_size, help="SAM input size in pixels (≥ 96 is "
                   "legible); SigLIP sees half of it")
    p.add_argument("--token-merge", choices=("1", "2", "both"), default="1",
                   help="2: average visual tokens 2x2 before the LM (4x fewer); both: train and compare both")
    p.add_argument("--task-tags", choices=("off", "on", "both"), default="off",
                   help="put each request's task tag ('[chart] ') in front of its question in stages 2-3 and at "
                   "inference; both: train with and without and print the ablation at the same steps")
    p.add_argument("--difficulty", choices=sorted(tasks.DIFFICULTIES), default=d.difficulty)
    p.add_argument("--train-size", type=int, default=d.n_train, help="train requests written")
    p.add_argument("--eval-size", type=int, default=d.n_eval, help="held-out requests scored")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--read-share", type=float, default=d.read_share,
                   help="share of stage 3's requests that are transcriptions ('Read everything in the image.')")
    p.add_argument("--lora", type=int, default=d.lora_rank, metavar="R",
                   help="stage 3 trains rank-R LoRA adapters on the LLM (alpha 2R) instead of the LLM in full; "
                   "the adaptor and towers still train in full (0: off)")
    p.add_argument("--freeze-sam", action="store_true", help="keep SAM frozen in stage 3, as the paper")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="also score the held-out split every N stage-3 "
                   "steps: the accuracy-versus-time curve")
    p.add_argument("--no-transformers", action="store_true", help="skip the export + transformers answer")
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run of every step (tiny data)")
    return p


def settings_from_args(argv=None) -> Settings:
    a = parser().parse_args(argv)
    families = tuple(f.strip() for f in a.families.split(",") if f.strip())
    unknown = [f for f in families if f not in tasks.FAMILIES]
    if unknown or not families:
        raise SystemExit(f"--families: unknown {unknown or '(none given)'}; known: {','.join(tasks.FAMILIES)}")
    merges = (1, 2) if a.token_merge == "both" else (int(a.token_merge),)
    tags = {"off": (False,), "on": (True,), "both": (False, True)}[a.task_tags]
    try:
        steps = parse_steps(a.steps)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        lr_mult = tuple((k.strip(), float(v)) for k, v in (kv.split("=") for kv in a.lr_mult.split(",") if kv.strip()))
    except ValueError:
        raise SystemExit(f"--lr-mult {a.lr_mult!r}: expected 'group=factor,...'") from None
    s = Settings(workdir=a.workdir, steps=steps, stage0=a.stage0, stream=a.stream, weight_decay=a.weight_decay,
                 lr_mult=lr_mult, families=families, seed=a.seed, image_size=a.image_size,
                 token_merge=merges, task_tags=tags, difficulty=a.difficulty, n_train=a.train_size, n_text=max(1, a.train_size // 4),
                 n_eval=a.eval_size, batch=a.batch, lr=a.lr, train_sam=not a.freeze_sam,
                 check_transformers=not a.no_transformers, eval_every=max(0, a.eval_every), lora_rank=a.lora,
                 read_share=a.read_share)
    if not 0 <= a.read_share < 1:
        raise SystemExit(f"--read-share {a.read_share}: expected a share in [0, 1)")
    if a.lora < 0:
        raise SystemExit(f"--lora {a.lora}: expected a rank ≥ 1, or 0 for full fine-tuning")
    if a.quick:
        s = dataclasses.replace(s, **QUICK)
    return s


def main(argv=None) -> int:
    s = settings_from_args(argv)
    summary = run(s)
    hf, ev = summary.get("transformers", {}), summary.get("dsvl_eval", {})
    hf_differs = hf and "skipped" not in hf and not hf.get("same_answer")
    eval_differs = "skipped" not in ev and not ev.get("equal")
    return 1 if hf_differs or eval_differs else 0
