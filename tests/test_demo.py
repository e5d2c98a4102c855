"""`python -m dsvl_jax.demo --quick`: every step of the demo on a few records, end to end.

Checks what a user relies on: the tables print, each stage leaves an Orbax checkpoint (the last one loads),
the export is a transformers checkpoint that answers the held-out question exactly as we do, dsvl-eval
scores the final checkpoint with the after-table's answers, and the summary holds the per-family figures. The full demo's accuracy is measured by `make demo`, not here.
"""
import json
import os

import pytest

from dsvl_jax import tasks
from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.demo import cli, evaluate, recipe
from dsvl_jax.demo.captions import describe
from dsvl_jax.demo.run import parse_steps


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    assert cli.main(["--quick", "--workdir", workdir, "--families", "document,chart,scene"]) == 0
    out = capsys.readouterr().out
    assert out.count("family") >= 2 and "before" in out and "after" in out  # the two tables
    for f in ("document", "chart", "scene"):
        assert f"\n{f}" in out
    assert "\nmap" not in out  # only the asked-for families

    assert "no-image guess" in out
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary["no_image_guess"]["per_family"]) == {"document", "chart", "scene"}
    run = summary["runs"]["merge1"]
    assert set(run["after"]["per_family"]) == {"document", "chart", "scene"}
    assert all(0.0 <= v <= 1.0 for v in run["after"]["per_family"].values())
    assert set(run["stage_seconds"]) == {"1", "2", "3"}
    for stage in (1, 2, 3):
        assert os.path.isdir(os.path.join(workdir, "merge1", f"stage{stage}", "checkpoints"))
        assert os.path.isfile(os.path.join(workdir, "merge1", f"stage{stage}", "metrics.jsonl"))
        assert os.listdir(os.path.join(workdir, "merge1", f"stage{stage}", "tensorboard"))
    cfg, params = load_orbax_params(os.path.join(workdir, "merge1", "stage3"))
    assert cfg.is_hybrid and cfg.token_merge == 1 and params["language_model"]

    hf = summary["transformers"]
    assert "skipped" not in hf, hf
    assert hf["same_tokens"] and hf["same_answer"], hf
    assert hf["max_logit_diff"] <= 1e-4, hf
    assert os.path.isfile(os.path.join(hf["folder"], "processor_config.json"))
    assert "transformers (AutoProcessor" in out

    # dsvl-eval on the final checkpoint (demo split, prompt, answer length) gives the after-table's answers
    ev = summary["dsvl_eval"]
    assert ev["equal"] and ev["same_answers"] == ev["requests"] == 12 and ev["mean"] == run["after"]["mean"], ev
    assert "dsvl-eval --ckpt merge1/stage3 --format suite --data heldout:12:0:families=document,chart,scene" in out
    assert json.load(open(ev["out"]))["overall"] == ev["mean"]


def test_steps_flag():
    assert parse_steps("800") == (100, 100, 600)
    assert parse_steps("5,0,20") == (5, 0, 20)
    for bad in ("4", "1,2", "1,2,0", "-1,2,3"):
        with pytest.raises(ValueError):
            parse_steps(bad)


def test_bad_family_is_named():
    with pytest.raises(SystemExit, match="nope"):
        cli.settings_from_args(["--families", "document,nope"])


def test_read_share_flag():
    assert cli.settings_from_args(["--read-share", "0"]).read_share == 0.0
    with pytest.raises(SystemExit, match="--read-share 1.5"):
        cli.settings_from_args(["--read-share", "1.5"])


def test_lora_flag_makes_stage_3_a_lora_run():
    assert cli.settings_from_args(["--lora", "8"]).lora_rank == 8
    with pytest.raises(SystemExit, match="--lora -1"):
        cli.settings_from_args(["--lora", "-1"])
    model = recipe.demo_model(300, 299)
    kw = dict(tokenizer="t.json", sources=[], tasks=("chart",), steps=10, batch=4, seq_len=64, lr=1e-3, seed=0,
              train_sam=True, lora_rank=8)
    c3, c2 = recipe.stage_config(3, model, **kw), recipe.stage_config(2, model, **kw)
    assert (c3.lora.rank, c3.lora.alpha, tuple(c3.lora.targets)) == (8, 16.0, ("llm",))
    assert tuple(c3.lora.full) == ("adaptor", "siglip", "sam")  # every other group of stage 3 still in full
    assert c2.lora.rank == 0  # stages 1-2 are unchanged


@pytest.mark.heavy
def test_quick_demo_with_lora_scores_the_merged_model(tmp_path, capsys):
    assert cli.main(["--quick", "--lora", "4", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "trains LoRA r=4 on the LLM, adaptor, siglip, sam in full" in out
    summary = json.load(open(tmp_path / "demo" / "summary.json"))
    assert summary["dsvl_eval"]["equal"] and summary["transformers"]["same_answer"]


def test_captions_name_every_drawn_string():
    """A caption is a transcription: every string drawn in the picture (titles aside) appears in it."""
    for family in tasks.FAMILIES:
        for i in range(3):
            e = tasks.generate(family, 0, i, 96)
            words = {w.rstrip(",;.:") for w in describe(e).lower().split()}
            skip = {"tick", "clock", "compass"}  # axis ticks, status-bar clock, compass rose
            for t in e.meta.get("texts", []):
                if t["role"] not in skip:
                    for word in t["text"].lower().split():
                        assert word.lstrip("$x") in words, (family, t, words)


def test_no_image_guess_answers_the_prior_of_each_question_kind():
    examples = tasks.make_split("heldout", 12, ("scene", "chart"), 96, 0)
    prior = {(e.task, e.kind): e.answer for e in examples[:4]}  # some kinds known, others not
    sc = evaluate.prior_baseline(examples, prior)
    for (_, family, guess, truth, ok), e in zip(sc.predictions, examples):
        assert guess == prior.get((e.task, e.kind), "") and ok == tasks.exact_match(guess, truth)
    hits = [row[4] for row in sc.predictions if row[1] == "scene"]
    assert sc.per_family["scene"] == sum(hits) / len(hits)
