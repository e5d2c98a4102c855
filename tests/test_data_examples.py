"""Examples and packed rows on a hand-made corpus of every record kind: tokens, loss masks, image slots."""
from __future__ import annotations

import grain
import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.data import packing as P
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic
from dsvl_jax.data.transforms import ExampleMaker
from dsvl_jax.processing import chat
from dsvl_jax.processing import image as image_lib

CFG = C.tiny()  # hybrid: SAM 64 px, SigLIP 32 px, 16 tokens per image, image id 511
N_TOK = CFG.num_image_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return synthetic.corpus_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def maker(tok):
    return ExampleMaker(tok, CFG)


def _png(seed, h=20, w=30):
    return synthetic.random_image(np.random.default_rng(seed), h, w)


IMGS = [_png(i) for i in range(4)]
CORPUS = {
    "doc": R.Record("doc", "hand", "text", (R.text("the cat and the dog"),)),
    "caption": R.Record("cap", "hand", "caption", (R.image(0), R.text("a red photo")), (IMGS[0],)),
    "interleaved": R.Record("inter", "hand", "interleaved",
                            (R.text("page one text"), R.image(0), R.text(" middle text"), R.image(1), R.text(" end")),
                            (IMGS[1], IMGS[2])),
    "sft": R.Record("sft", "hand", "sft",
                    (R.image(0), R.text("what is this?", "user"), R.text("a dog", "assistant"),
                     R.text("and this?", "user"), R.text("a cat", "assistant")), (IMGS[3],)),
    "sft_system": R.Record("sys", "hand", "sft", (R.text("be brief", "system"), R.text("hi", "user"),
                                                  R.text("hello", "assistant"))),
}


def _enc(tok, text):
    return tok.encode(text, add_bos=False)


def _expected_document(tok, pieces):
    """pieces: str or "IMG"; expected ids and supervision, built with plain `encode` per piece."""
    ids, sup = [tok.bos_id], [False]
    for p in pieces:
        t = [CFG.image_token_id] * N_TOK if p == "IMG" else _enc(tok, p)
        ids += t
        sup += [p != "IMG"] * len(t)
    return ids + [tok.eos_id], sup + [True]


def _views(blobs):
    x = np.stack([image_lib.square_image(b, CFG.image_size, image_lib.processor_background(CFG)) for b in blobs])
    return image_lib.model_views(x, CFG)


def _runs(sup):
    """Maximal runs of True as (start, end)."""
    out, start = [], None
    for i, s in enumerate(list(sup) + [False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("name, pieces", [
    ("doc", ["the cat and the dog"]),
    ("caption", ["IMG", "a red photo"]),
    ("interleaved", ["page one text", "IMG", " middle text", "IMG", " end"]),
])
def test_document_tokens_and_mask(tok, maker, name, pieces):
    rec = CORPUS[name]
    ex = maker.make(rec)
    ids, sup = _expected_document(tok, pieces)
    np.testing.assert_array_equal(ex["ids"], ids)
    np.testing.assert_array_equal(ex["supervised"], sup)
    starts = [i for i in range(len(ids)) if ids[i] == CFG.image_token_id and (i == 0 or ids[i - 1] != ids[i])]
    np.testing.assert_array_equal(ex["image_starts"], starts)
    assert ex["splittable"] and ex["task_id"] == maker.tasks.index(rec.task) + 1
    if rec.images:
        views = _views(rec.images)
        for key in ("pixel_values", "high_res_pixel_values"):
            np.testing.assert_array_equal(ex[key], views[key])
    else:
        assert ex["pixel_values"].shape == (0, 3, 32, 32) and ex["high_res_pixel_values"].shape == (0, 3, 64, 64)


def test_conversation_tokens_and_mask(tok, maker):
    ex = maker.make(CORPUS["sft"])
    conv = [{"role": "User", "content": chat.IMAGE_TAG + "what is this?"}, {"role": "Assistant", "content": "a dog"},
            {"role": "User", "content": "and this?"}, {"role": "Assistant", "content": "a cat"}]
    prompt = chat.format_prompt(conv)
    assert prompt.startswith(chat.SYSTEM_PROMPT + "\n\nUser: <image_placeholder>what is this?\n\nAssistant: a dog")
    flat = tok.encode(prompt, add_bos=True)
    expected = []
    for t in flat:
        expected += [t] * (N_TOK if t == CFG.image_token_id else 1)
    np.testing.assert_array_equal(ex["ids"], expected)
    answers = [tok.decode(ex["ids"][a:b], skip_special=False) for a, b in _runs(ex["supervised"])]
    assert answers == [f" a dog{chat.EOS_TOKEN}", f" a cat{chat.EOS_TOKEN}"]
    assert not ex["supervised"][ex["ids"] == CFG.image_token_id].any()
    assert not ex["splittable"]
    np.testing.assert_array_equal(ex["pixel_values"], _views(CORPUS["sft"].images)["pixel_values"])


def test_conversation_with_system_prompt(tok, maker):
    ex = maker.make(CORPUS["sft_system"])
    text = tok.decode(ex["ids"], skip_special=False)
    assert text == f"{chat.BOS_TOKEN}be brief\n\nUser: hi\n\nAssistant: hello{chat.EOS_TOKEN}"
    answers = [tok.decode(ex["ids"][a:b], skip_special=False) for a, b in _runs(ex["supervised"])]
    assert answers == [f" hello{chat.EOS_TOKEN}"]


def _pack(examples, spec):
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    it = iter(P.PackIterDataset(ds, spec))
    return list(it), it.stats


def _spec(tok, **kw):
    base = dict(seq_len=128, max_images=3, max_examples=4, num_image_tokens=N_TOK, image_token_id=CFG.image_token_id,
                pad_id=tok.pad_id, image_size=CFG.siglip.image_size, high_res_size=CFG.sam.image_size)
    return P.RowSpec(**{**base, **kw})


def _check_row(row, placed, spec):
    """placed: list of (example, start, end) in row order; checks every key of the row against them."""
    p, slot = 0, 0
    for k, (ex, a, b) in enumerate(placed):
        n = b - a
        seg = slice(p, p + n)
        np.testing.assert_array_equal(row["input_ids"][seg], ex["ids"][a:b])
        np.testing.assert_array_equal(row["targets"][p:p + n - 1], ex["ids"][a + 1:b])
        np.testing.assert_array_equal(row["loss_mask"][p:p + n - 1], ex["supervised"][a + 1:b].astype(np.float32))
        assert row["loss_mask"][p + n - 1] == 0.0  # no loss across the example boundary
        np.testing.assert_array_equal(row["positions"][seg], np.arange(n))
        assert (row["segment_ids"][seg] == k + 1).all() and (row["task_ids"][seg] == ex["task_id"]).all()
        assert row["record_index"][k] == (ex["code"] if a == 0 else P.CONTINUATION)
        for j in np.flatnonzero((ex["image_starts"] >= a) & (ex["image_starts"] < b)):
            run_start = p + ex["image_starts"][j] - a
            assert (row["input_ids"][run_start:run_start + N_TOK] == CFG.image_token_id).all()
            assert row["image_mask"][slot]
            np.testing.assert_array_equal(row["pixel_values"][slot], ex["pixel_values"][j])
            np.testing.assert_array_equal(row["high_res_pixel_values"][slot], ex["high_res_pixel_values"][j])
            slot += 1
        p += n
    # padding
    assert (row["input_ids"][p:] == spec.pad_id).all() and (row["loss_mask"][p:] == 0).all()
    assert (row["segment_ids"][p:] == 0).all() and (row["task_ids"][p:] == 0).all()
    assert not row["image_mask"][slot:].any() and not row["pixel_values"][slot:].any()
    assert (row["record_index"][len(placed):] == P.EMPTY_SLOT).all()
    # the image slots are in the order of the placeholder runs of the row
    ids = row["input_ids"]
    run_starts = [i for i in range(len(ids)) if ids[i] == CFG.image_token_id and (i == 0 or ids[i - 1] != ids[i])]
    assert len(run_starts) == slot == row["image_mask"].sum()


def _examples(maker, names):
    out = []
    for code, name in enumerate(names):
        ex = maker.make(CORPUS[name])
        out.append({**ex, "code": code, "source": "hand", "record_id": CORPUS[name].record_id})
    return out


def test_packing_every_kind(tok, maker):
    names = ["doc", "caption", "interleaved", "sft", "sft_system", "doc"]
    exs = _examples(maker, names)
    spec = _spec(tok)
    rows, stats = _pack(exs, spec)
    # greedy: fill a row until the next example does not fit
    placed, current, length, images = [], [], 0, 0
    for ex in exs:
        n, k = len(ex["ids"]), len(ex["image_starts"])
        if current and (length + n > spec.seq_len or images + k > spec.max_images or len(current) == spec.max_examples):
            placed.append(current)
            current, length, images = [], 0, 0
        current.append((ex, 0, n))
        length, images = length + n, images + k
    placed.append(current)
    assert len(rows) == len(placed) >= 2
    for row, pl in zip(rows, placed):
        _check_row(row, pl, spec)
    assert stats.examples == len(exs) and stats.total_skipped == 0 and stats.rows == len(rows)


def test_unpacked_rows_hold_one_example(tok, maker):
    exs = _examples(maker, ["doc", "caption", "sft"])
    spec = _spec(tok, max_examples=1)
    rows, _ = _pack(exs, spec)
    assert len(rows) == 3
    for row, ex in zip(rows, exs):
        _check_row(row, [(ex, 0, len(ex["ids"]))], spec)


def test_truncation_never_cuts_an_image(tok, maker):
    (ex,) = _examples(maker, ["interleaved"])
    second = int(ex["image_starts"][1])
    seq_len = second + N_TOK // 2  # the cut would fall inside the second image's run
    spec = _spec(tok, seq_len=seq_len, long_examples=P.TRUNCATE)
    rows, stats = _pack([ex], spec)
    assert len(rows) == 1
    _check_row(rows[0], [(ex, 0, second)], spec)
    assert rows[0]["image_mask"].sum() == 1
    assert stats.truncated == 1 and stats.dropped_tokens == len(ex["ids"]) - second


def test_split_carries_the_rest_into_the_next_row(tok, maker):
    exs = _examples(maker, ["doc", "interleaved", "doc"])
    inter = exs[1]
    second = int(inter["image_starts"][1])
    seq_len = second + N_TOK // 2
    spec = _spec(tok, seq_len=seq_len, long_examples=P.SPLIT)
    rows, stats = _pack(exs, spec)
    n_doc, n_int = len(exs[0]["ids"]), len(inter["ids"])
    # row 0: doc + as much of the interleaved doc as fits before an image run is cut
    b0 = P.chunk_end(inter, 0, seq_len - n_doc, spec.max_images, N_TOK)
    expected = [[(exs[0], 0, n_doc), (inter, 0, b0)]]
    a = b0
    while a < n_int:
        b = P.chunk_end(inter, a, seq_len, spec.max_images, N_TOK)
        expected.append([(inter, a, b)])
        a = b
    expected[-1].append((exs[2], 0, len(exs[2]["ids"])))  # the last chunk is short: the next doc joins it
    assert len(rows) == len(expected)
    for row, pl in zip(rows, expected):
        _check_row(row, pl, spec)
    assert stats.split == 1 and stats.examples == 3
    # no chunk boundary falls inside an image run
    for pl in expected:
        for ex, a, b in pl:
            for s in ex["image_starts"]:
                assert not (s < a < s + N_TOK) and not (s < b < s + N_TOK)


def test_max_images_per_row(tok, maker):
    exs = _examples(maker, ["caption", "interleaved", "caption"])
    spec = _spec(tok, seq_len=256, max_images=2)
    rows, _ = _pack(exs, spec)
    # caption (1 image) + interleaved (2 images) exceed 2 slots: the interleaved doc opens the next row
    assert [r["image_mask"].sum() for r in rows] == [1, 2, 1]
    _check_row(rows[1], [(exs[1], 0, len(exs[1]["ids"]))], spec)


def test_image_larger_than_a_row_is_a_counted_skip(tok, maker):
    exs = _examples(maker, ["caption", "doc"])
    spec = _spec(tok, seq_len=N_TOK)  # the caption's image run starts at 1 and needs 16 positions
    rows, stats = _pack(exs, spec)
    assert stats.skipped == {"image does not fit in a row": 1}
    assert len(rows) == 1
    _check_row(rows[0], [(exs[1], 0, len(exs[1]["ids"]))], spec)


def test_packer_state_resumes_mid_example(tok, maker):
    exs = _examples(maker, ["doc", "interleaved", "caption", "interleaved", "doc", "sft"])
    spec = _spec(tok, seq_len=40, long_examples=P.SPLIT)
    full, full_stats = _pack(exs, spec)
    ds = P.PackIterDataset(grain.MapDataset.source(exs).to_iter_dataset(), spec)
    for cut in range(1, len(full)):
        it = iter(ds)
        for _ in range(cut):
            next(it)
        state = it.get_state()
        it2 = iter(ds)
        it2.set_state(state)
        rest = list(it2)
        assert len(rest) == len(full) - cut
        for a, b in zip(rest, full[cut:]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        assert it2.stats.to_state() == full_stats.to_state()  # counters ride in the state


def test_siglip_only_model_rows(tmp_path, tok):
    """The 1.3B layout: one 32-px SigLIP view per image, no high-res key in the batch."""
    from dsvl_jax.data import loader as L
    from dsvl_jax.data.mixture import SourceConfig

    cfg = C.tiny(hybrid=False)
    R.write_records(str(tmp_path / "cap"), [CORPUS["caption"]])
    dc = L.DataConfig(sources=(SourceConfig("cap", str(tmp_path / "cap-*")),), num_epochs=1, max_images_per_row=2)
    (batch,) = list(L.make_train_iterator(dc, cfg, tok, batch_size=1, seq_len=64, seed=0, process_index=0,
                                          process_count=1))
    assert set(batch) == set(L.BATCH_KEYS) - {"high_res_pixel_values"}
    assert batch["pixel_values"].shape == (1, 2, 3, 32, 32) and batch["image_mask"].tolist() == [[True, False]]
    x01 = image_lib.square_image(IMGS[0], 32, (127, 127, 127))  # the 1.3B processor pads with 0.5 grey
    np.testing.assert_array_equal(batch["pixel_values"][0, 0], (x01 - np.float32(0.5)) / np.float32(0.5))
