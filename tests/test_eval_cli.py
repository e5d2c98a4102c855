"""`dsvl-eval` on every format with small files written here and a tiny random-weight checkpoint: scores
are the metric of each prediction, predictions are what `VLM.generate` gives each prompt alone, bad rows
are counted skips with their reason, and argument / file errors are one line with exit status 2."""
import base64
import io
import json

import numpy as np
import pytest

from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.eval import cli, formats, metrics, runner, suite_tsv
from dsvl_jax.processing.processor import Processor
from dsvl_jax.serve import model as M
from tests.helpers.tiny_checkpoint import picture, write_checkpoint

# Batches of 8, as the serving tests decode: the two files share their compiled programs.
BATCH = ["--batch", "8", "--mesh", "none", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval_ckpt"))
    write_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    for i in range(3):
        picture(i).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


REFERENCES = {
    "vqa": [{"answers": ["two"] * 4 + ["2"] * 6, "answer_type": "number"},
            {"answers": [{"answer": "red"}] * 10, "answer_type": "other"}, {"answers": ["yes"] * 10}],
    "docvqa": [{"answers": ["ACME Inc."]}, {"answers": ["12", "twelve"]}, {"answers": ["May 3"]}],
    "chartqa": [{"answer": "12.5", "category": "human"}, {"answer": "Blue"}, {"label": "40%"}],
    "pope": [{"answer": "yes", "category": "random"}, {"answer": "no", "category": "popular"}, {"label": "Yes"}],
}


def jsonl_file(data, fmt, refs=None):
    good = [{"question_id": 100 + i, "question": f"What is shown in picture {i}?", "image": f"img{i}.png", **ref}
            for i, ref in enumerate(refs or REFERENCES[fmt])]
    bad = ['{"question": "no closing brace"', ["a list"],
           {"question": "Where?", **REFERENCES[fmt][0]},  # no image
           {"question": "Broken?", "image": "broken.png", **REFERENCES[fmt][0]},
           {"question": "Missing?", "image": "nowhere.png", **REFERENCES[fmt][0]},
           {"question": "Two?", "image": ["img0.png", "img1.png"], **REFERENCES[fmt][0]}]
    bad[1] = json.dumps(bad[1])
    return write_jsonl(data / f"{fmt}.jsonl", good[:1] + bad + good[1:])


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(argv, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def solo_answers(ckpt, items, max_new):
    """Each prompt alone through Processor + VLM.generate (batch of one): what batching must not change."""
    vlm = load_pretrained(ckpt)
    processor = Processor.from_pretrained(ckpt, config=vlm.config)
    tok = processor.tokenizer
    out = {}
    for item in items:
        batch = processor(runner.conversation(item))
        ids = vlm.generate(batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"], max_new_tokens=max_new, eos_token_id=tok.eos_id)
        row = ids[0].tolist()
        out[item.id] = tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row).strip()
    return out


SCORE = {"vqa": lambda p, r: metrics.vqa_accuracy(p, [a["answer"] if isinstance(a, dict) else a
                                                      for a in r["answers"]]),
         "docvqa": lambda p, r: metrics.anls(p, r["answers"]),
         "chartqa": lambda p, r: metrics.relaxed_accuracy(p, r["answer"]),
         "pope": lambda p, r: float(metrics.pope_answer(p) == r["label"])}


@pytest.mark.parametrize("fmt", ["vqa", "docvqa", "chartqa", "pope"])
def test_jsonl_formats_score_each_prediction_and_skip_bad_rows(ckpt, data, tmp_path, fmt):
    path = jsonl_file(data, fmt)
    out_json = str(tmp_path / "r.json")
    rc, out, err = run(["--ckpt", ckpt, "--data", path, "--format", fmt, "--out", out_json, "--max-images", "1"]
                       + BATCH)
    assert rc == 0, err
    result = json.load(open(out_json))
    preds = result["predictions"]
    assert [p["id"] for p in preds] == ["100", "101", "102"]
    reasons = {s["row"]: s["reason"] for s in result["skipped"]}
    assert len(reasons) == 6, reasons
    assert "invalid JSON" in reasons[f"{fmt}.jsonl line 2"]
    assert "JSON object" in reasons[f"{fmt}.jsonl line 3"]
    assert "'image'" in reasons[f"{fmt}.jsonl line 4"]
    assert "not a recognised image" in reasons[f"{fmt}.jsonl line 5"]
    assert "file not found" in reasons[f"{fmt}.jsonl line 6"]
    assert "at most 1" in reasons[f"{fmt}.jsonl line 7"]
    for p in preds:
        assert p["score"] == pytest.approx(SCORE[fmt](p["prediction"], p["reference"]))
    assert result["overall"] == pytest.approx(np.mean([p["score"] for p in preds]))
    assert result["questions"] == 3 and "skipped 6 row(s)" in out
    assert "overall" in out and result["metric"] in out
    if fmt == "pope":
        assert set(result["per_category"]) == {"random", "popular", "all"}
        assert set(result["pope"]) >= {"precision", "recall", "f1", "yes_ratio"}
        assert result["pope"]["tp"] + result["pope"]["fp"] + result["pope"]["tn"] + result["pope"]["fn"] == 3


def test_batched_answers_equal_solo_and_a_right_answer_scores_one(ckpt, data, tmp_path):
    path = jsonl_file(data, "vqa")
    out_json = str(tmp_path / "r.json")
    assert run(["--ckpt", ckpt, "--data", path, "--format", "vqa", "--out", out_json] + BATCH)[0] == 0
    preds = {p["id"]: p["prediction"] for p in json.load(open(out_json))["predictions"]}
    items = [i for i in formats.read("vqa", path)[0] if i.id in preds]  # the rows that were not skipped
    assert solo_answers(ckpt, items, 16) == preds
    assert len(preds) == 4 and len(set(preds.values())) == 4 and all(preds.values())  # the 2-image row too
    # The same questions with the model's own answers as the truth: every question scores 1.
    refs = [{"answers": [preds[str(100 + i)]] * 10} for i in range(3)]
    path = jsonl_file(data, "vqa", refs)
    argv = ["--ckpt", ckpt, "--data", path, "--format", "vqa", "--out", out_json, "--max-images", "1"]
    assert run(argv + BATCH)[0] == 0
    result = json.load(open(out_json))
    assert result["overall"] == 1.0 and result["questions"] == 3


def _png_b64(seed):
    buf = io.BytesIO()
    picture(seed).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_tsv_circular_with_skips(ckpt, data, tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [[0, "What colour?", "Look closely.", "red", "green", "blue", "", "B", "attribute", _png_b64(0)],
            [1, "How many?", "nan", "one", "two", "", "", "A", "count", "0"],  # the image of row index 0
            [2, "Broken?", "", "x", "y", "", "", "A", "count", "!!notbase64!!"],
            [3, "Out of range?", "", "x", "y", "", "", "C", "count", _png_b64(1)],
            [4, "", "", "x", "y", "", "", "A", "count", _png_b64(2)]]
    path = tmp_path / "mmb.tsv"
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header] + rows) + "\n")
    out_json = str(tmp_path / "r.json")
    rc, out, err = run(["--ckpt", ckpt, "--data", str(path), "--format", "mmbench", "--out", out_json] + BATCH)
    assert rc == 0, err
    result = json.load(open(out_json))
    assert [p["id"] for p in result["predictions"]] == ["0/r0", "0/r1", "0/r2", "1/r0", "1/r1"]
    assert "hint" not in result["predictions"][3]["question"] and result["predictions"][0]["question"].startswith(
        "Look closely.\nWhat colour?\nA. red\nB. green\nC. blue\n")
    reasons = {s["row"]: s["reason"] for s in result["skipped"]}
    assert "base64" in reasons["mmb.tsv row 3"] and "'C' is not one of" in reasons["mmb.tsv row 4"]
    assert "no 'question'" in reasons["mmb.tsv row 5"]
    by_group = {}
    for p in result["predictions"]:
        assert p["read"] == metrics.mmbench_choice(p["prediction"], p["reference"]["options"])
        assert p["score"] == float(p["read"] == p["reference"]["answer"])
        by_group.setdefault(p["group"], []).append(p["score"])
    assert result["overall"] == pytest.approx(np.mean([min(v) for v in by_group.values()]))
    assert set(result["per_category"]) == {"attribute", "count"}


def test_suite_in_memory_and_as_mmbench_tsv(ckpt, tmp_path):
    out_json = str(tmp_path / "r.json")
    rc, out, err = run(["--ckpt", ckpt, "--data", "heldout:6", "--format", "suite", "--out", out_json] + BATCH)
    assert rc == 0, err
    result = json.load(open(out_json))
    assert list(result["per_category"]) == ["document", "chart", "table", "ui", "map", "scene"]
    assert "mean of categories" in out
    # The held-out split as an MMBench TSV goes through the MMBench reader, rotations and matcher.
    tsv = str(tmp_path / "suite.tsv")
    assert suite_tsv.main([tsv, "--n", "3"]) == 0
    items, skips = formats.read("mmbench", tsv)
    assert not skips and len({i.group for i in items}) == 3
    for item in items:  # the suite's answer is among the options, at the letter the TSV names
        assert item.reference["options"][item.reference["answer"]] in {"9", "Q2", "A"}
    rc, out, err = run(["--ckpt", ckpt, "--data", tsv, "--format", "mmbench", "--limit", "2", "--out", out_json]
                       + BATCH)
    assert rc == 0, err
    result = json.load(open(out_json))
    assert result["questions"] == 2 and set(result["per_category"]) == {"document", "chart"}


def test_suite_options_and_system_prompt_give_the_demo_scorers_answers(ckpt, tmp_path):
    """`--data heldout:N:SEED:families=..:image_size=..` is the split `make demo` scores, and `--system-prompt`
    its prompt: the predictions are those of the demo's own scorer (Processor + VLM.generate on the batch)."""
    from dsvl_jax import tasks
    from dsvl_jax.demo import evaluate as demo_eval
    spec = "heldout:5:1:families=scene,chart:image_size=64"
    s = formats.parse_suite_spec(spec)
    assert (s.split, s.n, s.seed, s.families, s.image_size, s.difficulty) == (
        "heldout", 5, 1, ("scene", "chart"), 64, "standard")
    examples = tasks.make_split("heldout", 5, ("scene", "chart"), 64, 1)
    items, _ = formats.read("suite", spec)
    assert [i.id for i in items] == [e.id for e in examples]
    assert all(np.array_equal(np.asarray(i.images[0]), np.asarray(e.image)) for i, e in zip(items, examples))
    out_json = str(tmp_path / "r.json")
    rc, out, err = run(["--ckpt", ckpt, "--data", spec, "--format", "suite", "--system-prompt", "Answer briefly.",
                        "--max-new-tokens", "5", "--out", out_json] + BATCH)
    assert rc == 0, err
    result = json.load(open(out_json))
    assert result["settings"]["system_prompt"] == "Answer briefly." and list(result["per_category"]) == ["scene",
                                                                                                     "chart"]
    vlm = load_pretrained(ckpt)
    processor = Processor.from_pretrained(ckpt, config=vlm.config, system_prompt="Answer briefly.")
    answers = demo_eval.answer(vlm, processor, examples, max_new_tokens=5, batch_size=8)
    assert {p["id"]: p["prediction"] for p in result["predictions"]} == {e.id: a for e, a in zip(examples, answers)}
    assert result["overall"] == demo_eval.score_predictions(examples, answers, 0.0).mean


def test_argument_and_file_errors_are_one_line(ckpt, data, tmp_path):
    tsv = tmp_path / "cols.tsv"
    tsv.write_text("index\tquestion\n0\tq\n")
    cases = [
        (["--ckpt", ckpt, "--data", str(tmp_path / "none.jsonl"), "--format", "vqa"], "none.jsonl"),
        (["--ckpt", ckpt, "--data", str(tsv), "--format", "mmbench"], "missing column"),
        (["--ckpt", ckpt, "--data", "heldout:x", "--format", "suite"], "heldout[:N[:SEED]]"),
        (["--ckpt", ckpt, "--data", "heldout:3:0:families=chart,nope", "--format", "suite"], "'nope'"),
        (["--ckpt", ckpt, "--data", "heldout:3:0:image_size=8", "--format", "suite"], "image_size=8"),
        (["--ckpt", ckpt, "--data", "heldout:3:0:colour=red", "--format", "suite"], "'colour'"),
        (["--ckpt", ckpt, "--data", "heldout", "--format", "gqa"], "--format"),
        (["--ckpt", ckpt, "--data", "heldout", "--format", "suite", "--batch", "0"], "--batch 0"),
        (["--ckpt", str(tmp_path / "nockpt"), "--data", "heldout", "--format", "suite"], "nockpt"),
        (["--ckpt", ckpt, "--data", "heldout", "--format", "suite", "--out", "/no/such/dir/r.json"], "/no/such/dir"),
        (["--ckpt", str(data), "--data", "heldout:1", "--format", "suite"], "tokenizer"),
        (["--data", "heldout", "--format", "suite"], "--ckpt"),
    ]
    for argv, needle in cases:
        rc, out, err = run(argv)
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("dsvl-eval: error: ") and needle in err, (argv, err)
        assert "Traceback" not in err


def test_mesh_choice():
    mesh = M.choose_mesh("auto")  # tests run on 8 CPU devices
    assert mesh is not None and dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(M.choose_mesh("2,2,2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert M.choose_mesh("none") is None
    with pytest.raises(M.LoadError, match="--mesh '1,1,3'"):
        M.choose_mesh("1,1,3")
    with pytest.raises(M.LoadError, match="DATA,FSDP,TENSOR"):
        M.choose_mesh("eight")
