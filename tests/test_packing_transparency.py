"""Packing is transparent (issue 13).

Packed rows from the real loader (`make_train_iterator`, pack=True; a multimodal source of
conversations with 0, 1 and 2 images, a multi-turn one and an image caption document, mixed with a
text-only source) go through the model exactly as the train step feeds them. For every example of
every row, the logits at its positions must equal the logits of the same example run alone through
the `Processor` and the runtime `VLM` (fp32, max|Δ| <= 1e-4), and the loss mask must cover exactly the
tokens the record says are supervised: each assistant answer with its EOS (conversations), or the
document's text with its EOS, never system/user/image tokens or padding. The expected supervised
text is derived from the record's strings alone, not from the pipeline's mask code.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from dsvl_jax import tasks
from dsvl_jax.data import records as R
from dsvl_jax.data.loader import DataConfig, make_train_iterator
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.data.packing import CONTINUATION, EMPTY_SLOT
from dsvl_jax.demo import recipe
from dsvl_jax.models.vlm import DeepseekVL, dummy_inputs
from dsvl_jax.processing.chat import EOS_TOKEN, IMAGE_TAG
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer
from dsvl_jax.runtime import VLM
from dsvl_jax.train.step import forward_hidden

IMAGE_SIZE = 64
SEQ_LEN = 192
BATCH = 4
N_BATCHES = 2
TOL = 1e-4
FAMILIES = ("scene", "chart", "document")
SIZE = recipe.ModelSize(image_size=IMAGE_SIZE, patch_size=8, sam_width=32, sam_layers=2, siglip_width=32,
                        siglip_layers=1, lm_width=32, lm_layers=2, lm_heads=2, context=256)


# ---------------------------------------------------------------------------------------------
# Records: each with its "alone" form (Processor input) and the text the loss must supervise
# ---------------------------------------------------------------------------------------------
def _conversation(rid, system, turns, pngs, task="sft"):
    """turns: [(user text with IMAGE_TAGs, assistant answer), ...]; images lead their user text."""
    segs, k = [R.text(system, "system")], 0
    for user, answer in turns:
        for piece in user.split(IMAGE_TAG):
            if piece:
                segs.append(R.text(piece, "user"))
            segs.append(R.image(k))
            k += 1
        segs.pop()  # one image per tag, not per piece
        k -= 1
        segs.append(R.text(answer, "assistant"))
    assert k == len(pngs)
    rec = R.Record(rid, "mm", task, tuple(segs), tuple(pngs))
    messages = []
    it = iter(pngs)
    for user, answer in turns:
        n = user.count(IMAGE_TAG)
        messages.append({"role": "User", "content": user, "images": [next(it) for _ in range(n)]})
        messages.append({"role": "Assistant", "content": answer})
    alone = {"system": system, "conversation": messages}
    expected = [f" {answer.strip()}{EOS_TOKEN}" for _, answer in turns]
    return rec, alone, expected


def _build_records():
    system = "Answer briefly."
    mm, txt = [], []
    ex = [tasks.generate(FAMILIES[i % 3], 0, i, IMAGE_SIZE) for i in range(12)]
    png = [e.png_bytes() for e in ex]
    for i in range(6):  # one image each
        mm.append(_conversation(f"qa-{i}", system, [(f"{IMAGE_TAG}{ex[i].question}", ex[i].answer)], [png[i]]))
    mm.append(_conversation("two-images", "Compare the two pictures.",
                            [(f"{IMAGE_TAG}First picture.{IMAGE_TAG}{ex[6].question}", ex[6].answer)],
                            [png[6], png[7]]))
    mm.append(_conversation("two-turns", system, [(f"{IMAGE_TAG}{ex[8].question}", ex[8].answer),
                                                 ("Are you sure?", f"Yes, {ex[8].answer}.")], [png[8]]))
    mm.append(_conversation("no-image", system, [("What is two plus two?", "four")], []))
    caption = f"A picture. {ex[9].question} {ex[9].answer}."
    mm.append((R.Record("caption", "mm", "caption", (R.image(0), R.text(caption)), (png[9],)),
               {"prompt": f"{IMAGE_TAG}{caption}{EOS_TOKEN}", "images": [png[9]]}, [f"{caption}{EOS_TOKEN}"]))
    for i, para in enumerate(tasks.text_corpus(6, 0, FAMILIES)):
        txt.append((R.Record(f"text-{i}", "txt", "text", (R.text(para),)),
                    {"prompt": f"{para}{EOS_TOKEN}", "images": []}, [f"{para}{EOS_TOKEN}"]))
    return mm, txt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("packing_transparency"))
    mm, txt = _build_records()
    R.write_records(os.path.join(root, "mm"), [r for r, _, _ in mm], num_shards=1)
    R.write_records(os.path.join(root, "txt"), [r for r, _, _ in txt], num_shards=1)
    corpus = [s.text for r, _, _ in mm + txt for s in r.segments if not s.is_image]
    tok = build_bpe_tokenizer(corpus * 4 + ["Answer briefly.\n\nUser: \n\nAssistant:"] * 8, 420,
                              os.path.join(root, "tok"))
    cfg = recipe.demo_model(tok.vocab_size, tok.image_token_id, 1, SIZE)
    module = DeepseekVL(cfg)
    ids, images = dummy_inputs(cfg)
    params = nn.meta.unbox(jax.jit(lambda k: module.init(k, ids, **images))(jax.random.key(0))["params"])
    records = {r.record_id: (r, alone, expected) for r, alone, expected in mm + txt}
    return dict(tok=tok, cfg=cfg, module=module, params=params, records=records,
                sources=(SourceConfig("mm", paths=os.path.join(root, "mm") + "-*.array_record", weight=2.0),
                         SourceConfig("txt", paths=os.path.join(root, "txt") + "-*.array_record", weight=1.0,
                                      modality="text")))


def _packed_logits(module, params, batch, text_only):
    """The train step's own model call (`dsvl_jax.train.step.forward_hidden`), then the logits."""
    h = forward_hidden(module, params, batch, text_only)
    return module.apply({"params": params}, h, method=DeepseekVL.logits_from_hidden)


def _runs(mask):
    """Maximal runs of True in a 1-D bool array, as (start, end) pairs."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_packed_rows_match_examples_run_alone(setup):
    s = setup
    tok, cfg, module, params = s["tok"], s["cfg"], s["module"], s["params"]
    data = DataConfig(sources=s["sources"], pack=True, max_examples_per_row=8, max_images_per_row=4)
    it = make_train_iterator(data, cfg, tok, batch_size=BATCH, seq_len=SEQ_LEN, seed=3, process_index=0,
                             process_count=1)
    forward = jax.jit(lambda p, b, text_only: _packed_logits(module, p, b, text_only), static_argnums=2)

    segments = []  # (record id, packed ids, packed logits, loss mask, targets)
    rows_multi = text_only_examples = text_rows = 0
    for _ in range(N_BATCHES):
        text_only = it.step_is_text_only()
        batch = next(it)
        feed = {k: jnp.asarray(v) for k, v in batch.items() if k != "record_index"}
        logits = np.asarray(forward(params, feed, text_only))
        for b in range(BATCH):
            seg = batch["segment_ids"][b]
            codes = batch["record_index"][b]
            n_seg = int(seg.max())
            assert CONTINUATION not in codes, "a record was split across rows: pick a longer SEQ_LEN"
            assert (codes[:n_seg] >= 0).all() and (codes[n_seg:] == EMPTY_SLOT).all(), codes
            pad = seg == 0
            assert not batch["loss_mask"][b][pad].any(), "loss on padding"
            assert (batch["input_ids"][b][pad] == tok.pad_id).all()
            n_images = int(batch["image_mask"][b].sum())
            rows_multi += n_seg >= 2 and n_images >= 2
            text_rows += all(it.record_key(int(c))[0] == "txt" for c in codes[:n_seg])
            for k in range(n_seg):
                pos = np.flatnonzero(seg == k + 1)
                assert (np.diff(pos) == 1).all() and (batch["positions"][b][pos] == np.arange(len(pos))).all()
                source, rid = it.record_key(int(codes[k]))
                rec = s["records"][rid][0]
                assert rec.source == source
                text_only_examples += rec.num_images == 0
                segments.append((rid, batch["input_ids"][b][pos], logits[b][pos], batch["loss_mask"][b][pos],
                                 batch["targets"][b][pos]))
    stats = it.stats()
    assert stats.total_skipped == 0 and stats.truncated == 0 and stats.split == 0, stats  # every record whole
    assert rows_multi >= 2, f"only {rows_multi} rows hold >= 2 examples and >= 2 images"
    assert text_only_examples >= 1 and text_rows >= 1, (text_only_examples, text_rows)
    assert {rid for rid, *_ in segments} >= {"two-images", "two-turns", "no-image", "caption"}, \
        sorted({rid for rid, *_ in segments})

    # The same examples, each alone (one Processor batch, left-padded: rows never see each other).
    processor_inputs, processor_images = [], []
    for rid, *_ in segments:
        alone = s["records"][rid][1]
        if "conversation" in alone:
            proc = Processor(tok, cfg, system_prompt=alone["system"])
            processor_inputs.append(proc.format(alone["conversation"]))
            processor_images.append([im for m in alone["conversation"] for im in m.get("images", [])])
        else:
            processor_inputs.append(alone["prompt"])
            processor_images.append(alone["images"])
    ref = Processor(tok, cfg)(processor_inputs, processor_images)
    vlm = VLM(cfg, params)
    alone_logits = np.asarray(vlm(ref["input_ids"], pixel_values=ref["pixel_values"],
                                  high_res_pixel_values=ref["high_res_pixel_values"],
                                  attention_mask=ref["attention_mask"]))

    worst = 0.0
    for i, (rid, ids, logits, loss_mask, targets) in enumerate(segments):
        real = ref["attention_mask"][i] == 1
        np.testing.assert_array_equal(ids, ref["input_ids"][i][real], err_msg=f"{rid}: packed tokens differ")
        delta = float(np.abs(logits - alone_logits[i][real]).max())
        worst = max(worst, delta)
        assert delta <= TOL, f"{rid} (example {i}): packed vs alone logits differ by {delta:.3e}"

        # Loss mask: targets are the next tokens of the example, and the supervised ones decode to the record's
        # assistant answers (+ EOS) or document text (+ EOS), one contiguous run each, nothing else.
        expected = s["records"][rid][2]
        np.testing.assert_array_equal(targets[:-1], ids[1:], err_msg=rid)
        assert loss_mask[-1] == 0, f"{rid}: loss on the token after the example"
        assert set(np.unique(loss_mask)) <= {0.0, 1.0}
        runs = _runs(loss_mask > 0)
        got = [tok.decode(targets[a:e].tolist(), skip_special=False) for a, e in runs]
        assert got == expected, f"{rid}: supervised targets {got!r}, expected {expected!r}"
        assert not np.isin(targets[loss_mask > 0], [cfg.image_token_id, tok.bos_id]).any()
    print(f"{len(segments)} packed examples, max |logit delta| = {worst:.2e}")
