"""Exact resume through an Orbax checkpoint, with 0 and 2 worker processes; the record log; global arrays."""
from __future__ import annotations

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsvl_jax import config as C
from dsvl_jax.data import loader as L
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic
from dsvl_jax.data.mixture import MODALITIES, SourceConfig

CFG = C.tiny()
BATCH, SEQ, STEPS, CUT = 4, 160, 8, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tok = synthetic.corpus_tokenizer(str(d / "tok"))
    sources = synthetic.write_corpus(str(d / "corpus"), n_text=24, n_caption=12, n_interleaved=6, n_sft=6)
    # a few records the loader must skip, mixed into the multimodal stream
    bad = [b"not a record", R.serialize(R.Record("zero", "bad", "caption", (R.image(0), R.text("x")), (b"",)),
                                        check=False),
           R.serialize(R.Record("junk", "bad", "caption", (R.image(0), R.text("x")), (b"\x89PNG junk",)))]
    R.write_records(str(d / "corpus" / "bad"), bad)
    sources += (SourceConfig("bad", str(d / "corpus" / "bad-*"), weight=0.02),)
    dc = L.DataConfig(sources=sources, mm_warmup_steps=2, max_examples_per_row=4, max_images_per_row=3)
    return dc, tok, d


def _iterator(setup, workers):
    dc, tok, _ = setup
    return L.make_train_iterator(dc, CFG, tok, batch_size=BATCH, seq_len=SEQ, seed=7, process_index=0,
                                 process_count=1, worker_count=workers)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def _run_with_restart(setup, workers, ckpt_dir):
    it = _iterator(setup, workers)
    first = [next(it) for _ in range(CUT)]
    mngr = ocp.CheckpointManager(ckpt_dir)
    mngr.save(CUT, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    it.close()
    it2 = _iterator(setup, workers)  # a fresh process would build the same pipeline
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    rest = [next(it2) for _ in range(STEPS - CUT)]
    stats = it2.stats()
    it2.close()
    return first + rest, stats


def _check_record_log(batches, stats):
    """Each record code appears once; with the skipped ones, every stream position up to the last is there."""
    codes = np.concatenate([b["record_index"].ravel() for b in batches])
    codes = codes[codes >= 0]
    assert len(set(codes.tolist())) == len(codes), "a record repeated"
    skipped = [r["code"] for r in stats.recent]
    assert len(skipped) == stats.total_skipped > 0  # the bad records did come up
    positions = {m: set() for m in range(len(MODALITIES))}
    for code in list(codes) + skipped:
        n, process, m = L.decode_record_code(code, 1)
        assert process == 0
        positions[m].add(n)
    for m, seen in positions.items():
        if seen:  # every position up to the last one is either in a batch or a counted skip
            assert seen == set(range(max(seen) + 1)), MODALITIES[m]


def test_resume_without_workers(setup, tmp_path):
    it = _iterator(setup, 0)
    uninterrupted = [next(it) for _ in range(STEPS)]
    resumed, stats = _run_with_restart(setup, 0, tmp_path / "ckpt")
    _assert_same(uninterrupted, resumed)
    assert set(resumed[0]) == set(L.BATCH_KEYS)  # the trainer contract (hybrid model: both views)
    assert stats.to_state() == it.stats().to_state()
    _check_record_log(resumed, stats)
    for b in resumed:
        assert all(np.isfinite(b[k]).all() for k in ("loss_mask", "pixel_values", "high_res_pixel_values"))
    assert any(b["image_mask"].any() for b in resumed) and any(not b["image_mask"].any() for b in resumed)


@pytest.mark.slow
def test_resume_with_two_workers_matches_no_workers(setup, tmp_path):
    reference = [next(it) for it in [_iterator(setup, 0)] for _ in range(STEPS)]
    resumed, stats = _run_with_restart(setup, 2, tmp_path / "ckpt")
    _assert_same(reference, resumed)  # workers only map: batches do not depend on their number
    _check_record_log(resumed, stats)


def test_state_is_plain_json_and_checked(setup):
    import json

    it = _iterator(setup, 0)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 1 and set(state["streams"]) == set(MODALITIES)
    text_only = L.DataConfig(sources=tuple(s for s in setup[0].sources if s.modality == "text"))
    other = L.make_train_iterator(text_only, CFG, setup[1], batch_size=BATCH, seq_len=SEQ, seed=7,
                                  process_index=0, process_count=1)
    with pytest.raises(ValueError, match="streams"):
        other.set_state(state)


def test_process_shards_are_disjoint(setup):
    dc, tok, _ = setup
    text = L.DataConfig(sources=tuple(s for s in dc.sources if s.modality == "text"), num_epochs=1, pack=False)
    seen = []
    for p in range(2):
        it = L.make_train_iterator(text, CFG, tok, batch_size=2, seq_len=SEQ, seed=7, process_index=p,
                                   process_count=2)
        rows = [b["input_ids"][0].tobytes() for b in it]
        assert len(rows) == 12  # 24 records, 12 per process
        seen.append(set(rows))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24


def test_global_batch_on_the_mesh(setup):
    import jax

    from dsvl_jax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    local = next(_iterator(setup, 0))
    batch = L.global_batch(local, mesh)
    assert set(batch) == set(local)
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape == local[k].shape and v.dtype == local[k].dtype
        assert v.sharding.spec[0] == ("data", "fsdp")
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == BATCH // 4
        np.testing.assert_array_equal(np.asarray(v), local[k])
