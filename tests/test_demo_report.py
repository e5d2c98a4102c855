"""The demo's report PNG (`dsvl_jax.demo.report`) and the exported folder's batch answers under transformers
(`hf_check.score_with_transformers`), which must be our own greedy answers (`evaluate.answer`)."""
import os

import numpy as np
import pytest
from PIL import Image

from dsvl_jax import tasks
from dsvl_jax.demo import report

pytest.importorskip("matplotlib")

FAMILIES = ("document", "chart", "scene")
AFTER = (0x2F, 0x6D, 0xB5)  # report.COLUMN_COLORS["after"]


def _examples(n=8):
    out = []
    for i in range(n):
        e = tasks.generate("scene", 0, i, 96)
        ok = i % 2 == 0
        out.append((e.image, e.question, e.answer if ok else "$5 and\nnonsense that runs past the cell", e.answer, ok))
    return out


def _curve():
    return [{"stage3_step": s, "mean": m,
             "per_family": {f: min(1.0, m * (1 + 0.2 * k)) for k, f in enumerate(FAMILIES)}}
            for s, m in ((0, 0.02), (100, 0.2), (200, 0.45), (300, 0.6))]


def _columns(after: float):
    return {"before": {f: 0.0 for f in FAMILIES}, "no-image guess": {f: 0.2 for f in FAMILIES},
            "images shuffled": {"document": 0.1, "chart": 0.3, "scene": 0.25},
            "after": {"document": after, "chart": 0.9, "scene": 0.5}}


def _pixels(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (report.FIGSIZE[0] * report.DPI, report.FIGSIZE[1] * report.DPI)
        return np.asarray(im.convert("RGB"))


def test_report_draws_the_three_panels(tmp_path):
    path = report.write_report(str(tmp_path / "sub" / "report.png"), curve=_curve(), families=FAMILIES,
                               columns=_columns(0.8), examples=_examples(), title="test report")
    assert path == str(tmp_path / "sub" / "report.png") and os.path.isfile(path)
    px = _pixels(path)
    h, w, _ = px.shape
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # not a blank canvas
    bars = px[: h // 2, w // 2:]  # the top-right panel
    assert (bars == AFTER).all(-1).sum() > 2000  # the "after" bars are drawn, in their colour
    grid = px[h // 2:]
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 50  # the held-out images


def test_report_changes_with_the_scores(tmp_path):
    a = _pixels(report.write_report(tmp_path / "a.png", curve=_curve(), families=FAMILIES, columns=_columns(0.8),
                                    examples=_examples()))
    b = _pixels(report.write_report(tmp_path / "b.png", curve=_curve(), families=FAMILIES, columns=_columns(0.3),
                                    examples=_examples()))
    h, w, _ = a.shape
    assert (a[: h // 2, w // 2:] != b[: h // 2, w // 2:]).any()  # the bars differ
    assert (a[h // 2:] == b[h // 2:]).all()  # the image grid does not
    assert (a == AFTER).all(-1).sum() > (b == AFTER).all(-1).sum()  # a taller "after" bar


def test_report_without_curve_or_examples(tmp_path):
    px = _pixels(report.write_report(tmp_path / "empty.png", curve=[], families=(), columns=_columns(0.5),
                                     examples=[]))
    assert (px == AFTER).all(-1).any()


@pytest.mark.slow
def test_transformers_answers_the_batch_as_we_do(tmp_path):
    """Random-init params, exported: transformers (folder only, left-padded batches) answers each held-out
    request with the same string as our `evaluate.answer`."""
    from dsvl_jax.demo import hf_check
    missing = hf_check.transformers_available()
    if missing:
        pytest.skip(missing)
    import jax

    from dsvl_jax import sharding
    from dsvl_jax.demo import data, evaluate, recipe
    from dsvl_jax.processing.processor import Processor
    from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer
    from dsvl_jax.state import init_params
    from dsvl_jax.runtime import VLM

    heldout = tasks.make_split("heldout", 6, ("scene", "chart", "document"), 96, 0)
    tok_dir = str(tmp_path / "tokenizer")
    texts = [f"{data.SYSTEM_PROMPT}\n\nUser: {e.question}\n\nAssistant: {e.answer}" for e in heldout] * 8
    tok = build_bpe_tokenizer(texts, 300, tok_dir)
    size = recipe.ModelSize(image_size=96, sam_width=32, sam_layers=2, siglip_width=32, siglip_layers=1,
                            lm_width=64, lm_layers=2, lm_heads=2)
    model = recipe.demo_model(tok.vocab_size, tok.image_token_id, 1, size)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    vlm = VLM(model, jax.device_get(init_params(model, mesh, 0)))
    processor = Processor(tok, model, system_prompt=data.SYSTEM_PROMPT)

    ours = evaluate.answer(vlm, processor, heldout, max_new_tokens=6, batch_size=len(heldout))
    folder = hf_check.export(vlm, tok_dir, str(tmp_path / "hf"))
    # Batches of 4: a full one and a partial one, prompts of several lengths (left padding).
    theirs = hf_check.score_with_transformers(folder, heldout, max_new_tokens=6, batch_size=4)
    assert len({len(processor.format(evaluate.prompt(e))) for e in heldout}) > 1
    assert theirs == ours
