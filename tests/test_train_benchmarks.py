"""Benchmarks inside training (`dsvl_jax.train.benchmarks`): the scores land in metrics.jsonl at their steps,
the best step's params are kept in workdir/best/ and score there what was logged, a run stopped and resumed
with benchmarks on ends bit-identical to an uninterrupted one, and a bad benchmark spec is a one-line
ConfigError before anything trains."""
import io
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax import tasks
from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.errors import ConfigError
from dsvl_jax.eval import cli as eval_cli
from dsvl_jax.processing.chat import SYSTEM_PROMPT
from dsvl_jax.train import validate
from dsvl_jax.train.trainer import train
from tests.helpers.train_fixtures import tiny_config

SUITE = "heldout:4:0:families=chart,scene"


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory):
    """Three yes/no questions on suite pictures (a file format beside the in-memory suite)."""
    root = tmp_path_factory.mktemp("pope")
    rows = []
    for i, e in enumerate(tasks.make_split("heldout", 3, ("chart", "scene"), 96, 5)):
        e.image.save(root / f"{i}.png")
        rows.append({"question_id": i, "question": "Is this a chart?", "image": f"{i}.png",
                     "answer": "yes" if e.task == "chart" else "no", "category": e.task})
    path = root / "pope.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(text_corpus, pope_file, **kw):
    # text-only steps of 4 on the tiny config: the programs of test_train's guard test (compilation cache)
    srcs, tok = text_corpus
    base = dict(total_steps=4, log_every=2, benchmark_every=2, keep_best="suite/score",
                benchmarks=[dict(name="suite", format="suite", data=SUITE, batch=4, max_new_tokens=4),
                            dict(name="pope", format="pope", data=pope_file, batch=4, max_new_tokens=2)],
                **{"checkpoint.async_save": False, "checkpoint.every": 2})  # steps 2 and 4 kept
    base.update(kw)
    return tiny_config("stage2", srcs, tok, **base)


@pytest.fixture(scope="module")
def full(text_corpus, pope_file, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("bench") / "full")
    return wd, train(_cfg(text_corpus, pope_file), wd)


def _bench_rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if r["split"] == "bench"]


def _predictions(workdir, step):
    return json.load(open(os.path.join(workdir, "benchmarks", f"{step}.json")))["benchmarks"]


@pytest.mark.slow
def test_scores_are_logged_at_their_steps(full):
    wd, summary = full
    rows = _bench_rows(wd)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert 0.0 <= r["suite/score"] <= 1.0 and r["suite/questions"] == 4 and r["suite/skipped"] == 0
        assert {"suite/category/chart", "suite/category/scene"} <= set(r) and r["suite/seconds"] > 0
        assert r["pope/questions"] == 3 and 0.0 <= r["pope/score"] <= 1.0 and "pope/yes_ratio" in r
        # the predictions file holds what each score was computed from, with the settings used
        preds = _predictions(wd, r["step"])
        for name, n in (("suite", 4), ("pope", 3)):
            scores = [p["score"] for p in preds[name]["predictions"]]
            assert len(scores) == n and preds[name]["overall"] == pytest.approx(r[f"{name}/score"])
        assert np.mean(scores) == pytest.approx(r["pope/score"])  # pope: the mean over questions
        assert preds["suite"]["settings"] == {"batch": 4, "max_new_tokens": 4, "limit": 0,
                                              "system_prompt": SYSTEM_PROMPT}
    assert summary["bench/suite/score"] == rows[-1]["suite/score"]
    assert os.listdir(os.path.join(wd, "tensorboard"))


@pytest.mark.slow
def test_best_checkpoint_loads_and_reproduces_its_score(full):
    wd, _ = full
    rows = _bench_rows(wd)
    values = [r["suite/score"] for r in rows]
    best = json.load(open(os.path.join(wd, "best", "best.json")))
    assert best == {"metric": "suite/score", "value": max(values), "step": rows[int(np.argmax(values))]["step"]}
    # a training dir of params: dsvl-convert's reader and dsvl-eval (load_pretrained + the tokenizer) take it
    cfg, params = load_orbax_params(os.path.join(wd, "best"))
    same_step = load_orbax_params(wd, best["step"])
    assert cfg == same_step[0]
    a, b = (traverse_util.flatten_dict(p, sep="/") for p in (params, same_step[1]))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the params of that step
    out_json = os.path.join(wd, "best_eval.json")
    rc = eval_cli.main(["--ckpt", os.path.join(wd, "best"), "--format", "suite", "--data", SUITE, "--batch", "4",
                        "--max-new-tokens", "4", "--no-progress", "--out", out_json], out=io.StringIO(),
                       err=io.StringIO())
    assert rc == 0
    again = json.load(open(out_json))
    logged = _predictions(wd, best["step"])["suite"]
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in logged["predictions"]]
    assert again["overall"] == best["value"]


@pytest.mark.slow
def test_stop_and_resume_with_benchmarks_is_bit_identical(full, text_corpus, pope_file, tmp_path):
    wd_full, _ = full
    part = str(tmp_path / "part")
    s1 = train(_cfg(text_corpus, pope_file, stop_at_step=2), part)
    assert s1["stopped_at"] == 2 and json.load(open(os.path.join(part, "best", "best.json")))["step"] == 2
    s2 = train(_cfg(text_corpus, pope_file), part)
    assert s2["step"] == 4
    a, b = (traverse_util.flatten_dict(load_orbax_params(d)[1], sep="/") for d in (wd_full, part))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    drop = ("time", "suite/seconds", "pope/seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(_bench_rows(part)) == strip(_bench_rows(wd_full))
    assert json.load(open(os.path.join(part, "best", "best.json"))) == \
        json.load(open(os.path.join(wd_full, "best", "best.json")))
    for step in (2, 4):
        assert _predictions(part, step)["suite"]["predictions"] == _predictions(wd_full, step)["suite"]["predictions"]


def test_a_bad_benchmark_spec_is_one_config_error_before_training(text_corpus, pope_file, tmp_path):
    suite = dict(name="suite", format="suite", data=SUITE)
    cases = [
        (dict(benchmarks=[dict(suite, format="gqa")]), "format='gqa'"),
        (dict(benchmarks=[dict(name="v", format="vqa", data=str(tmp_path / "none.jsonl"))]), "no such file"),
        (dict(benchmarks=[dict(suite, data="heldout:x")]), "heldout[:N[:SEED]]"),
        (dict(benchmarks=[dict(suite, batch=0)]), "batch=0"),
        (dict(benchmarks=[dict(suite, colour="red")]), "'colour'"),
        (dict(benchmarks=[suite, suite]), "unique"),
        (dict(keep_best="pope/score", benchmarks=[suite]), "keep_best='pope/score'"),
        (dict(keep_best="suite/f1", benchmarks=[suite]), "keep_best='suite/f1'"),
        (dict(benchmarks=[]), "benchmarks is empty"),
        (dict(benchmarks=[suite], benchmark_every=0), "needs config.benchmark_every"),
        (dict(benchmarks_json="[{"), "benchmarks_json"),
    ]
    for kw, needle in cases:
        with pytest.raises(ConfigError) as e:
            validate.check(_cfg(text_corpus, pope_file, **kw))
        assert needle in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    # the command-line form reads the same specs
    validate.check(_cfg(text_corpus, pope_file, benchmarks=[], benchmarks_json=json.dumps([suite])))
    # a file that exists but has no usable row fails in train() before the first step
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"question": "no image"}\n')
    wd = str(tmp_path / "wd")
    with pytest.raises(ConfigError, match="no usable rows.*1 skipped"):
        train(_cfg(text_corpus, pope_file, benchmarks=[dict(name="v", format="vqa", data=str(empty))],
                   keep_best=""), wd)
    assert not os.path.exists(os.path.join(wd, "checkpoints"))
