"""The demo, step by step: corpus → tokenizer → before-table → stages 1, 2, 3 → after-table → export →
transformers answers one held-out question from the export → dsvl-eval scores the final checkpoint (the
same answers as the after-table). Returns (and writes) a JSON summary.

Each step prints what it did and how long it took; the trainer draws a progress bar per stage and writes
`metrics.jsonl` and TensorBoard events into the stage's folder under the workdir.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import shutil
import time
from typing import Callable, Sequence

import jax
from tqdm import tqdm

from dsvl_jax import sharding, tasks
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.demo import data, evaluate, hf_check, recipe, report
from dsvl_jax.demo.recipe import ModelSize
from dsvl_jax.eval import cli as eval_cli
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.runtime import VLM
from dsvl_jax.state import init_params
from dsvl_jax.train.trainer import train

CACHE = "jax_cache"  # XLA's persistent compilation cache, inside the workdir
STREAM_STAGE_OFFSET = 10_000_000  # each stage reads its own slice of the endless train stream
STAGE_NAMES = {0: "stage 0 (every part from scratch)", 1: "stage 1 (adaptor warm-up)",
               2: "stage 2 (joint pretraining)", 3: "stage 3 (SFT)"}


@dataclasses.dataclass(frozen=True)
class Settings:
    workdir: str = "workdir/demo"
    steps: tuple[int, int, int] = (60, 60, 1000)  # per stage: sized for ~15 min on 2 CPU cores
    stage0: int = 0  # steps of stage 0: every group from random weights, before the paper's stages
    stream: bool = False  # multimodal records drawn on demand (`stream.SuiteStream`): no image is seen twice
    # The adaptor feeds only RMS-normed LM inputs, so nothing bounds its output: at the shared LR with no
    # decay its tokens grow from norm 0.5 to 133 (text embeddings: 0.3) by stage-3 step 250. A tenth of
    # the LR and decay on matrices keep them at ~1 (`recipe.py` has the measurements).
    weight_decay: float = 0.1  # AdamW decay on matrices (optimizer.weight_decay)
    lr_mult: tuple[tuple[str, float], ...] = (("adaptor", 0.1),)  # per-group learning-rate factors
    families: tuple[str, ...] = tasks.FAMILIES
    seed: int = 0
    image_size: int = 96
    token_merge: tuple[int, ...] = (1,)
    task_tags: tuple[bool, ...] = (False,)  # (False, True): train both and print the ablation
    tag_stages: tuple[int, ...] = (2, 3)  # stages whose requests carry the task tag when tags are on
    difficulty: str = "standard"
    n_train: int = 3000  # train requests (each also gives one caption record)
    n_text: int = 750  # text-only paragraphs (stage 2)
    n_eval: int = 300  # held-out requests scored before and after
    batch: int = 16  # rows of seq_len tokens, each packed with several requests
    seq_len: int = 0  # 0: room for images_per_row requests, or one long transcription (`_seq_len`)
    images_per_row: int = 3
    lr: float = 2e-3
    text_share: float = 0.3  # text-only rows in stage 2
    read_share: float = 0.5  # transcription requests among stage 3's
    train_sam: bool = True
    vocab_size: int = 1024
    max_new_tokens: int = 0  # 0: the longest answer's tokens + EOS (`evaluate.answer_budget`)
    eval_batch: int = 50
    check_transformers: bool = True
    eval_every: int = 250  # > 0: score the held-out split every this many stage-3 steps (the learning curve)
    fresh: bool = True  # remove an earlier run's folders first (stages would otherwise resume)
    layers: tuple[int, int, int] | None = None  # (SAM, SigLIP, LM) blocks; None = `ModelSize`'s
    lora_rank: int = 0  # > 0: stage 3 trains rank-r LoRA adapters on the LLM instead of the LLM in full


class Clock:
    """Wall and process-CPU seconds per named phase."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable, *args, **kw):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        self.phases[name] = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load], "platform": platform.platform()}


def _say(msg: str = ""):
    print(msg, flush=True)


def run(s: Settings) -> dict:
    clock = Clock()
    workdir = os.path.abspath(s.workdir)
    if s.fresh and os.path.isdir(workdir):
        for name in os.listdir(workdir):  # the compile cache survives: a second run skips XLA compiles
            if name != CACHE:
                path = os.path.join(workdir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    m = machine()
    _say(f"dsvl_jax demo: {len(s.families)} task families, {s.image_size}px images, difficulty {s.difficulty}, "
         f"seed {s.seed}; workdir {workdir}")
    _say(f"machine: {m['cpus']} CPUs, load average {m['load_average']} (other work slows every figure below)")

    # 1. The corpus, through the real data pipeline.
    with tqdm(total=s.n_train, desc="writing the task suite", unit="req", dynamic_ncols=True) as bar:
        corpus = clock.run("corpus", data.write_corpus, os.path.join(workdir, "data"), n_train=s.n_train,
                           n_text=s.n_text, families=s.families, image_size=s.image_size, seed=s.seed,
                           difficulty=s.difficulty, vocab_size=s.vocab_size, progress=bar.update)
    heldout = clock.run("heldout", tasks.make_split, "heldout", s.n_eval, s.families, s.image_size, s.seed,
                        s.difficulty)
    tok = Tokenizer.from_file(corpus.tokenizer)
    _say(f"corpus: {corpus.counts} records as ArrayRecord shards under {corpus.root}; BPE tokenizer of "
         f"{tok.vocab_size} ids; {len(heldout)} held-out requests "
         f"({clock.phases['corpus']['wall_s'] + clock.phases['heldout']['wall_s']:.0f}s)")

    # The first requests of the train split, as trained on: their score against the held-out one measures
    # how much of what the model learned is memorised images rather than reading.
    seen = tasks.make_split("train", min(s.n_eval, s.n_train), s.families, s.image_size, s.seed, s.difficulty)
    budget = s.max_new_tokens or evaluate.answer_budget(tok, [e.answer for e in heldout + seen])
    _say(f"answers need up to {budget} new tokens (EOS included)")
    prior = evaluate.prior_baseline(heldout, corpus.prior_answers)
    summary = {"settings": dataclasses.asdict(s), "machine": m, "corpus": corpus.counts, "runs": {},
               "no_image_guess": prior.as_dict()}
    final = {}
    for merge in s.token_merge:
        for tags in s.task_tags:
            key = variant_name(merge, tags)
            summary["runs"][key], final[key] = _train_and_score(s, clock, workdir, corpus, tok, heldout, seen, prior,
                                                                budget, merge, tags)

    merges = {k: v for k, v in final.items() if not v.tags}
    if len(merges) == 2:
        _say("\nvisual-token compression (2x2 merge) on the same data and steps:")
        _say(evaluate.table({f"merge {v.merge} ({v.vlm.config.num_image_tokens} tok)": v.after
                             for v in merges.values()}))
        for v in merges.values():
            _say(f"  token_merge={v.merge}: training {v.train_wall:.0f}s wall, scoring "
                 f"{1000 * v.after.seconds / len(heldout):.0f} ms per request (compile included)")
    for merge in s.token_merge:
        pair = [final.get(variant_name(merge, t)) for t in (False, True)]
        if all(pair):
            _say(f"\ntask-tag prompting (token_merge={merge}), same data and steps:")
            _say(evaluate.table({"without tags": pair[0].after, "with tags": pair[1].after}))

    plain = final.get(variant_name(1, False)) or final.get(variant_name(1, True))
    if s.check_transformers and plain is not None:
        summary["transformers"] = _transformers_step(clock, workdir, corpus, plain, heldout, budget)
    elif s.check_transformers:
        _say("\ntransformers check skipped: the HF port has no 2x2 token merge, so it needs a token_merge=1 run")

    shown = plain or next(iter(final.values()))
    summary["dsvl_eval"] = _dsvl_eval_step(clock, workdir, s, shown, budget)
    columns = {"before": shown.before, "no-image guess": prior, "images shuffled": shown.shuffled,
               "after": shown.after}
    if "transformers_scores" in summary.get("transformers", {}):
        columns["transformers (export)"] = summary["transformers"]["transformers_scores"]
    summary["report"] = report.write_report(
        os.path.join(workdir, "report.png"), curve=shown.curve, families=list(shown.after.per_family),
        columns={k: v.per_family for k, v in columns.items()},
        examples=_grid_examples(heldout, shown.after),
        title=f"dsvl_jax demo: {shown.key}{f', stage 3 LoRA r={s.lora_rank}' if s.lora_rank else ''}, "
              f"{s.stage0 + sum(s.steps)} steps, {len(heldout)} held-out requests")
    _say(f"\nreport: {summary['report']}")
    if "transformers_scores" in summary.get("transformers", {}):
        summary["transformers"]["transformers_scores"] = summary["transformers"]["transformers_scores"].as_dict()

    summary["phases"] = clock.phases
    summary["total_wall_s"] = clock.total
    summary["total_cpu_s"] = time.process_time()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    _say(f"\ntotal: {clock.total:.0f}s wall ({summary['total_cpu_s']:.0f}s process CPU) on {m['cpus']} CPUs; "
         f"load average now {machine()['load_average']}; summary in {os.path.join(workdir, 'summary.json')}")
    return summary


@dataclasses.dataclass
class Variant:
    """One trained model of the demo and its scores."""

    key: str
    merge: int
    tags: bool
    vlm: object
    processor: object
    before: object
    after: object
    shuffled: object
    curve: list
    train_wall: float
    workdir: str  # the last stage's: its latest checkpoint is the final model


def variant_name(merge: int, tags: bool) -> str:
    return f"merge{merge}" + ("_tags" if tags else "")


def _train_and_score(s: Settings, clock: Clock, workdir, corpus, tok, heldout, seen, prior, budget, merge: int,
                     tags: bool) -> tuple[dict, Variant]:
    """Stages (0 →) 1 → 2 → 3 of one variant (token merge, task-tag prompting), scored before, during and after."""
    model = recipe.demo_model(tok.vocab_size, tok.image_token_id, merge, _size(s))
    processor = Processor(tok, model, system_prompt=data.SYSTEM_PROMPT)
    key = variant_name(merge, tags)
    _say(f"\n=== {key}: {model.num_image_tokens} visual tokens per image "
         f"({'2x2-merged' if merge == 2 else 'unmerged'}), task tags "
         f"{'in stages ' + ', '.join(map(str, s.tag_stages)) + ' and at inference' if tags else 'off'} ===")
    run_dir = os.path.join(workdir, key)
    os.makedirs(run_dir, exist_ok=True)
    ev = dict(max_new_tokens=budget, batch_size=s.eval_batch, task_tag=tags)
    before = clock.run(f"{key}/eval_before", evaluate.score, VLM(model, _fresh_params(model, s.seed)), processor,
                       heldout, **ev)
    _say(evaluate.table({"before": before}))

    prev, stage_times, curve = "", {}, []
    for stage, steps in [(0, s.stage0)] + list(zip((1, 2, 3), s.steps)):
        if steps <= 0:
            continue
        cfg = recipe.stage_config(
            stage, model, tokenizer=corpus.tokenizer, sources=_sources(stage, corpus, s),
            tasks=s.families, steps=steps, batch=s.batch, seq_len=_seq_len(s, model), lr=s.lr, seed=s.seed,
            init_from=prev, train_sam=s.train_sam, pack=True, images_per_row=s.images_per_row,
            task_tags=tags and stage in s.tag_stages, weight_decay=s.weight_decay, lr_mult=dict(s.lr_mult),
            lora_rank=s.lora_rank)
        wd = os.path.join(run_dir, f"stage{stage}")
        trains = ', '.join(cfg.trainable) if not cfg.lora.rank else \
            f"LoRA r={cfg.lora.rank} on the LLM, {', '.join(cfg.lora.full)} in full"
        _say(f"\n{STAGE_NAMES[stage]}: {steps} steps of {s.batch} rows x {cfg.seq_len} tokens, trains {trains}"
             + (" (SAM too: nothing here is pretrained; see dsvl_jax/demo/recipe.py)" if "sam" in cfg.trainable
                else ""))
        chunk = s.eval_every if stage == 3 and s.eval_every else 0
        name = f"{key}/stage{stage}"
        out, walls, cpus = {}, 0.0, 0.0
        while int(out.get("step", 0)) < steps:
            # 0: to the end; else stop (and save) every `chunk` steps, score, go on (the schedule stays `steps`)
            cfg.stop_at_step = min(int(out.get("step", 0)) + chunk, steps) if chunk else 0
            out = clock.run(name, train, cfg, wd)
            walls, cpus = walls + clock.phases[name]["wall_s"], cpus + clock.phases[name]["cpu_s"]
            if chunk:
                sc = evaluate.score(load_pretrained(wd), processor, heldout, **ev)
                point = {"stage3_step": int(out["step"]), "demo_wall_s": clock.total,
                         "train_wall_s": sum(t["wall_s"] for t in stage_times.values()) + walls,
                         "mean": sc.mean, "per_family": sc.per_family}
                curve.append(point)
                _say(f"  stage 3 step {point['stage3_step']}: mean exact match {100 * sc.mean:.1f}% after "
                     f"{point['demo_wall_s']:.0f}s of demo")
        clock.phases[name] = stage_times[stage] = {"wall_s": walls, "cpu_s": cpus}
        _say(f"{STAGE_NAMES[stage]}: loss {out.get('loss', float('nan')):.3f}, {walls:.0f}s wall")
        prev = wd
    vlm = load_pretrained(prev)  # a stage folder's latest checkpoint; a LoRA run's adapters merged
    after = clock.run(f"{key}/eval_after", evaluate.score, vlm, processor, heldout, **ev)
    shuffled = clock.run(f"{key}/eval_shuffled", evaluate.score, vlm, processor,
                         evaluate.with_shuffled_images(heldout, s.seed), **ev)
    seen_scores = clock.run(f"{key}/eval_seen", evaluate.score, vlm, processor, seen, **ev)
    _say(f"\nexact match on {len(heldout)} held-out requests ({key}). 'images shuffled': each request shown "
         f"another one's picture; 'train (seen)': {len(seen)} requests trained on:")
    _say(evaluate.table({"before": before, "no-image guess": prior, "images shuffled": shuffled, "after": after,
                         "train (seen)": seen_scores}))
    train_wall = sum(t["wall_s"] for t in stage_times.values())
    record = {
        "num_image_tokens": model.num_image_tokens, "task_tags": tags, "before": before.as_dict(),
        "after": after.as_dict(), "images_shuffled": shuffled.as_dict(), "train_seen": seen_scores.as_dict(),
        "stage_seconds": {str(k): v for k, v in stage_times.items()}, "train_wall_s": train_wall,
        "eval_s_per_request": after.seconds / max(1, len(heldout)), "checkpoint": os.path.join(prev, "checkpoints"),
        "curve": curve, "examples": [p for p in after.predictions[:12]]}
    return record, Variant(key, merge, tags, vlm, processor, before, after, shuffled, curve, train_wall, prev)


def _grid_examples(heldout, scores, n: int = 12) -> list[tuple]:
    """(image, question, prediction, truth, correct) for the report's grid: two per family where possible."""
    rows = {r[0]: r for r in scores.predictions}
    picked, per_family = [], {}
    for e in heldout:
        if per_family.get(e.task, 0) < max(1, n // 6) and len(picked) < n:
            per_family[e.task] = per_family.get(e.task, 0) + 1
            _, _, pred, truth, ok = rows[e.id]
            picked.append((e.image, e.question, pred, truth, bool(ok)))
    return picked


def _transformers_step(clock, workdir, corpus, variant: Variant, heldout, budget: int) -> dict:
    missing = hf_check.transformers_available()
    if missing:
        _say(f"\ntransformers check skipped: transformers/torch not importable ({missing}); "
             "`pip install -e .[test]` (what `make demo` does) brings them")
        return {"skipped": missing}
    folder = clock.run("export", hf_check.export, variant.vlm, os.path.dirname(corpus.tokenizer),
                       os.path.join(workdir, "hf_export"))
    _say(f"\nexported {variant.key} to {folder}: {', '.join(hf_check.folder_files(folder))}")
    example = heldout[0]
    res = clock.run("transformers", hf_check.answer_with_transformers, folder, variant.vlm, variant.processor,
                    example, max_new_tokens=budget)
    _say(f"held-out question: {res.question!r} (suite answer {res.expected!r})")
    _say(f"  dsvl_jax (Processor + VLM.generate):                 {res.ours!r}")
    _say(f"  transformers (AutoProcessor + generate, export only): {res.transformers!r}")
    _say(f"  equal: {res.same_answer}; on identical inputs: token ids equal {res.same_tokens}, "
         f"max |Δ logit| {res.max_logit_diff:.1e}")
    # The whole held-out split through transformers alone, with the plain prompt (system + question, no tag).
    preds = clock.run("transformers_scores", hf_check.score_with_transformers, folder, heldout,
                      max_new_tokens=budget)
    hf_scores = evaluate.score_predictions(heldout, preds, clock.phases["transformers_scores"]["wall_s"])
    _say(f"\nthe export scored by transformers alone (AutoProcessor + AutoModelForImageTextToText, greedy, plain "
         f"prompt) on the {len(heldout)} held-out requests:")
    _say(evaluate.table({"dsvl_jax": variant.after, "transformers (export)": hf_scores}))
    return dataclasses.asdict(res) | {"same_answer": res.same_answer, "same_tokens": res.same_tokens,
                                      "folder": folder, "transformers_scores": hf_scores}


def _dsvl_eval_step(clock, workdir, s: Settings, variant: Variant, budget: int) -> dict:
    """The final checkpoint scored again by `dsvl-eval --format suite`, with the demo's split, system prompt,
    answer length, batch and (no) mesh: the same prompts and greedy generation, so the same answers."""
    if variant.tags:
        _say("\ndsvl-eval check skipped: dsvl-eval's prompts carry no task tag")
        return {"skipped": "task tags"}
    spec = (f"heldout:{s.n_eval}:{s.seed}:families={','.join(s.families)}:image_size={s.image_size}"
            f":difficulty={s.difficulty}")
    out = os.path.join(workdir, "dsvl_eval.json")
    argv = ["--ckpt", variant.workdir, "--format", "suite", "--data", spec, "--batch", str(s.eval_batch),
            "--max-new-tokens", str(budget), "--system-prompt", data.SYSTEM_PROMPT, "--mesh", "none",
            "--no-progress", "--out", out]
    result = clock.run("dsvl_eval", eval_cli.run, eval_cli.build_parser().parse_args(argv), io.StringIO(),
                       io.StringIO())
    ours = {r[0]: r[2] for r in variant.after.predictions}
    theirs = {r["id"]: r["prediction"] for r in result["predictions"]}
    same = sum(ours.get(k) == v for k, v in theirs.items())
    equal = same == len(ours) == len(theirs) and result["overall"] == variant.after.mean
    _say(f"\ndsvl-eval --ckpt {os.path.relpath(variant.workdir, workdir)} --format suite --data {spec} "
         f"--system-prompt {result['settings']['system_prompt']!r} --max-new-tokens {budget}:\n"
         f"  mean {100 * result['overall']:.1f}%, the table's 'after' {100 * variant.after.mean:.1f}%: "
         + ("equal" if equal else "DIFFERENT")
         + f"; {same} of {len(ours)} answers identical ({clock.phases['dsvl_eval']['wall_s']:.0f}s)")
    return {"mean": result["overall"], "after_mean": variant.after.mean, "same_answers": same,
            "requests": len(ours), "equal": equal, "out": out}


def _size(s: Settings) -> ModelSize:
    size = ModelSize(image_size=s.image_size)
    if s.layers is not None:
        size = dataclasses.replace(size, sam_layers=s.layers[0], siglip_layers=s.layers[1], lm_layers=s.layers[2])
    return size


def _fresh_params(model, seed: int):
    """The params stage 1 starts from (the trainer's init with the same seed), on the host."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return jax.device_get(init_params(model, mesh, seed))


def _sources(stage: int, corpus, s: Settings) -> list[dict]:
    """Stage 1: image–caption pairs. Stage 2: captions and requests with text-only paragraphs mixed in.
    Stages 0 and 3: requests and transcription requests. Multimodal records come from the written pool, or
    with `s.stream` from `SuiteStream` (drawn on demand, offset per stage so no stage repeats another's)."""
    text_share, read_share = s.text_share, s.read_share

    def mm(name, w):
        if not s.stream:
            return dict(name=name, paths=getattr(corpus, name), weight=w, modality="multimodal")
        args = dict(kind=name, families=tuple(s.families), image_size=s.image_size, difficulty=s.difficulty,
                    seed=s.seed, offset=stage * STREAM_STAGE_OFFSET)
        return dict(name=name, generator="dsvl_jax.demo.stream:SuiteStream", generator_args=args, weight=w,
                    modality="multimodal")

    if stage == 1:
        return [mm("caption", 1.0)]
    if stage == 2:
        rest = 1.0 - text_share
        return [mm("caption", rest / 2), mm("qa", rest / 2),
                dict(name="text", paths=corpus.text, weight=text_share, modality="text")]
    return [mm("qa", 1.0 - read_share), mm("transcribe", read_share)] if read_share > 0 else [mm("qa", 1.0)]


def _seq_len(s: Settings, model) -> int:
    """A request is ≲ 28 text tokens beside its image; the longest transcription (a 4 x 3 table) ≲ 100."""
    if s.seq_len:
        return s.seq_len
    n = model.num_image_tokens
    return -(-max(s.images_per_row * (n + 28), n + 128) // 8) * 8


def parse_steps(text: str | int | Sequence[int]) -> tuple[int, int, int]:
    """"N" (a total, split 1:1:6 over the stages) or "a,b,c" (per stage)."""
    if isinstance(text, int):
        parts = [text]
    elif isinstance(text, str):
        parts = [int(p) for p in text.split(",") if p.strip()]
    else:
        parts = [int(p) for p in text]
    if len(parts) == 1:
        total = parts[0]
        if total < 8:
            raise ValueError(f"--steps {total}: a total needs at least 8 steps (1:1:6 over three stages)")
        a = b = total // 8
        return a, b, total - a - b
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[2] <= 0:
        raise ValueError(f"--steps {text!r}: expected a total or three per-stage counts a,b,c (c > 0)")
    return tuple(parts)
