"""Benchmarks scored inside training: dsvl-eval's formats, batched greedy runner and metrics, run on the live
params (on the training mesh) every `config.benchmark_every` steps.

    config.benchmarks = [{"name": "suite", "format": "suite", "data": "heldout:60"},
                         {"name": "mmb", "format": "mmbench", "data": "MMBench_DEV_EN.tsv", "limit": 200}]
    config.benchmark_every = 500
    config.keep_best = "suite/score"

Each benchmark logs `<name>/score` (dsvl-eval's overall), `<name>/category/<c>`, `<name>/questions`,
`<name>/skipped`, `<name>/seconds` (+ `first_rotation` for mmbench, `f1`, `precision`, `recall`,
`yes_ratio` for pope) under the "bench" split of metrics.jsonl and TensorBoard; every prediction with its
score goes to `workdir/benchmarks/<step>.json`. With `keep_best`, the params of the step where that metric
was highest (the first such step on a tie) are in `workdir/best/`: a training dir of params only
(model_config.json, checkpoints/<step>/state, the tokenizer) that dsvl-eval, dsvl-chat and dsvl-convert
read like any workdir, with `best.json` = {metric, value, step}; a resumed run reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Optional

import jax

from dsvl_jax.convert import export, orbax_io
from dsvl_jax.errors import ConfigError
from dsvl_jax.eval import formats, runner, scoring
from dsvl_jax.processing.processor import Processor

BEST_DIR, BEST_JSON, PREDICTIONS_DIR = "best", "best.json", "benchmarks"
# keep_best may name these (higher is better); `category/<c>` too.
BEST_METRICS = {"score": formats.FORMATS, "first_rotation": ("mmbench",), "f1": ("pope",)}


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    format: str
    data: str  # a file, or the suite's heldout[:N[:SEED]]...
    limit: int = 0  # questions scored (0 = all)
    batch: int = 8  # prompts per generation batch
    max_new_tokens: int = 0  # 0 = the format's default (formats.DEFAULT_MAX_NEW)
    max_images: int = 0  # skip rows with more images (0 = as many as the context holds)
    system_prompt: Optional[str] = None  # None = the Processor's (DeepSeek-VL's)


_FIELDS = {f.name for f in dataclasses.fields(Spec)}
_INTS = {"limit": 0, "batch": 1, "max_new_tokens": 0, "max_images": 0}  # field → least value


def raw_specs(config) -> list:
    """config.benchmarks, or its JSON twin config.benchmarks_json when set (the command-line form)."""
    text = config.get("benchmarks_json", "")
    if not text:
        return [dict(b) if hasattr(b, "keys") else b for b in config.benchmarks]
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config.benchmarks_json is not valid JSON: {e}") from None
    if not isinstance(value, list):
        raise ConfigError(f"config.benchmarks_json must be a JSON list of objects, got {text[:80]!r}")
    return value


def specs(config) -> list[Spec]:
    """The benchmarks of `config`, checked: known keys and format, a suite spec that parses or a file that
    exists, sane sizes, unique names. Raises a one-line ConfigError naming the entry."""
    out, names = [], set()
    for i, d in enumerate(raw_specs(config)):
        where = f"config.benchmarks[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where} = {d!r}: expected {{name, format, data, ...}}")
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_FIELDS)}")
        fmt = d.get("format")
        if fmt not in formats.FORMATS:
            raise ConfigError(f"{where}.format={fmt!r}: expected one of {', '.join(formats.FORMATS)}")
        data = d.get("data")
        if not isinstance(data, str) or not data:
            raise ConfigError(f"{where}.data: give the benchmark file (suite: {formats.SUITE_SPEC_HELP})")
        if fmt == "suite":
            try:
                formats.parse_suite_spec(data)
            except formats.DataError as e:
                raise ConfigError(f"{where}.data: {str(e).replace('--data ', '', 1)}") from None
        elif not os.path.isfile(data):
            raise ConfigError(f"{where}.data={data!r}: no such file")
        for key, least in _INTS.items():
            v = d.get(key, getattr(Spec, key))
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"{where}.{key}={v!r}: expected an integer >= {least}")
        prompt = d.get("system_prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"{where}.system_prompt={prompt!r}: expected a string (or null for the default)")
        name = d.get("name") or fmt
        if not isinstance(name, str) or "/" in name or name in names:
            raise ConfigError(f"{where}.name={name!r}: names must be unique strings without '/' (they prefix "
                              f"the metrics)")
        names.add(name)
        out.append(Spec(**{**d, "name": name}))
    return out


def check(config) -> list[Spec]:
    """The benchmark keys of `config` together: specs, benchmark_every, keep_best."""
    bench = specs(config)
    every = config.benchmark_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"config.benchmark_every={every!r}: expected steps >= 0 (0 = off)")
    if every and not bench:
        raise ConfigError(f"config.benchmark_every={every} but config.benchmarks is empty: nothing to score")
    if config.keep_best:
        if not every:
            raise ConfigError(f"config.keep_best={config.keep_best!r} needs config.benchmark_every > 0")
        name, _, metric = config.keep_best.partition("/")
        fmt = {b.name: b.format for b in bench}.get(name)
        ok = fmt is not None and (fmt in BEST_METRICS.get(metric, ()) or
                                  (metric.startswith("category/") and len(metric) > len("category/")))
        if not ok:
            choices = [f"{b.name}/{m}" for b in bench for m, fmts in BEST_METRICS.items() if b.format in fmts]
            raise ConfigError(f"config.keep_best={config.keep_best!r}: expected one of {choices} or "
                              f"<name>/category/<category>")
    return bench


@dataclasses.dataclass
class Loaded:
    spec: Spec
    items: list
    skips: list  # rows the reader could not use
    processor: object
    max_new_tokens: int


def load(bench: list[Spec], tokenizer, mcfg) -> list[Loaded]:
    """Read every benchmark's questions once, before training starts (a file with no usable row fails here)."""
    out = []
    for i, s in enumerate(bench):
        try:
            items, skips = formats.read(s.format, s.data, s.limit or None)
        except formats.DataError as e:
            raise ConfigError(f"config.benchmarks[{i}] ({s.name}): {e}") from None
        if not items:
            first = f"; first: {skips[0].row}: {skips[0].reason}" if skips else ""
            raise ConfigError(f"config.benchmarks[{i}] ({s.name}): {s.data} has no usable rows "
                              f"({len(skips)} skipped{first})")
        kw = {} if s.system_prompt is None else {"system_prompt": s.system_prompt}
        out.append(Loaded(s, items, skips, Processor(tokenizer, mcfg, **kw),
                          s.max_new_tokens or formats.DEFAULT_MAX_NEW[s.format]))
    return out


def score(loaded: list[Loaded], vlm) -> tuple[dict, dict]:
    """(metric name → value, benchmark name → dsvl-eval-like result with every prediction) for `vlm`."""
    scalars, results = {}, {}
    for b in loaded:
        s = b.spec
        answers, bad, seconds = runner.answer_all(vlm, b.processor, b.items, batch=s.batch,
                                                  max_new_tokens=b.max_new_tokens, max_images=s.max_images or None,
                                                  progress=False)
        summary = scoring.summarize(s.format, b.items, answers)
        skipped = list({(k.row, k.reason): k.as_dict() for k in b.skips + bad}.values())
        scalars.update({f"{s.name}/score": summary["overall"], f"{s.name}/questions": summary["questions"],
                        f"{s.name}/skipped": len(skipped), f"{s.name}/seconds": seconds})
        scalars.update({f"{s.name}/category/{c}": v["score"] for c, v in summary["per_category"].items()})
        if "first_rotation_accuracy" in summary:
            scalars[f"{s.name}/first_rotation"] = summary["first_rotation_accuracy"]
        if "pope" in summary:
            scalars.update({f"{s.name}/{k}": summary["pope"][k] for k in ("f1", "precision", "recall", "yes_ratio")})
        results[s.name] = {"format": s.format, "data": s.data, "metric": summary["metric"],
                           "overall": summary["overall"], "questions": summary["questions"],
                           "per_category": summary["per_category"], "skipped": skipped,
                           "settings": {"batch": s.batch, "max_new_tokens": b.max_new_tokens, "limit": s.limit,
                                        "system_prompt": b.processor.system_prompt},
                           "predictions": summary["records"]}
    return scalars, results


def write_predictions(workdir: str, step: int, results: dict) -> None:
    if jax.process_index() != 0:
        return
    folder = os.path.join(workdir, PREDICTIONS_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{step}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(scoring.json_safe({"step": step, "benchmarks": results}), f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Best:
    """The best value of one metric so far and its step's params in workdir/best/, swapped in whole: the new
    folder is written beside it (best.tmp), then renamed over it, so a kill leaves one complete folder."""

    def __init__(self, workdir: str, metric: str, mcfg):
        self.workdir, self.metric, self.mcfg = workdir, metric, mcfg
        self.dir = os.path.join(workdir, BEST_DIR)
        self.value: Optional[float] = None
        self.step: Optional[int] = None
        if jax.process_index() == 0:
            if not os.path.isdir(self.dir) and os.path.isdir(self.dir + ".old"):
                os.replace(self.dir + ".old", self.dir)  # killed between the two renames of a swap
            shutil.rmtree(self.dir + ".tmp", ignore_errors=True)
        _sync("dsvl_best_recovered")
        path = os.path.join(self.dir, BEST_JSON)
        if os.path.isfile(path):
            with open(path) as f:
                info = json.load(f)
            # Another metric's best says nothing about this one: it is replaced at the first score.
            if info.get("metric") == metric:
                self.value, self.step = float(info["value"]), int(info["step"])

    def update(self, step: int, scalars: dict, params) -> bool:
        """Save `params` as the best when the metric beats every earlier value; returns whether it did."""
        value = scalars.get(self.metric)
        if value is None or not math.isfinite(value) or (self.value is not None and value <= self.value):
            return False
        self._save(step, float(value), params)
        self.value, self.step = float(value), step
        return True

    def _save(self, step: int, value: float, params) -> None:
        import orbax.checkpoint as ocp

        tmp, old = self.dir + ".tmp", self.dir + ".old"
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _sync("dsvl_best_tmp")
        # Every process writes its own shards of the live params: nothing is gathered onto one host.
        mngr = ocp.CheckpointManager(os.path.join(tmp, orbax_io.CHECKPOINTS_DIR), item_names=(orbax_io.STATE,),
                                     options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
        try:
            mngr.save(step, args=ocp.args.Composite(**{orbax_io.STATE: ocp.args.StandardSave(
                orbax_io.train_state(step, params))}))
            mngr.wait_until_finished()
        finally:
            mngr.close()
        if jax.process_index() == 0:
            orbax_io.write_model_config(tmp, self.mcfg)
            export.copy_side_files(self.workdir, tmp)
            with open(os.path.join(tmp, BEST_JSON), "w") as f:
                json.dump({"metric": self.metric, "value": value, "step": step}, f, indent=1)
            if os.path.isdir(self.dir):
                os.replace(self.dir, old)
            os.replace(tmp, self.dir)
            shutil.rmtree(old, ignore_errors=True)
        _sync("dsvl_best_saved")
