"""Mixture proportions (text:multimodal with warm-up, sources within a modality) and their wiring."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from dsvl_jax import config as C
from dsvl_jax.data import loader as L
from dsvl_jax.data import mixture as M
from dsvl_jax.data import records as R
from dsvl_jax.data import synthetic

N = 10_000
TOL = 0.02


def test_paper_ratio_from_table1_weights():
    sources = [M.SourceConfig(name, paths="unused", weight=w, modality="text" if name == "text" else "multimodal")
               for name, w in M.PAPER_STAGE2_TABLE1.items()]
    schedule = M.ModalitySchedule.from_sources(sources)
    assert schedule.mm_share == pytest.approx(1 - M.PAPER_TEXT_SHARE)


@pytest.mark.parametrize("step", [0, 1, 100, 250, 500, 750, 999, 1000, 5000])
def test_row_modality_share_at_every_warmup_stage(step):
    schedule = M.ModalitySchedule(mm_share=0.3, warmup_steps=1000, seed=11)
    rows = [schedule.row_modality(step, r, N) for r in range(N)]  # one step of 10,000 rows
    target = 0.3 * min(step, 1000) / 1000
    assert abs(np.mean(rows) - target) <= TOL
    if step == 0:
        assert not any(rows)  # the multimodal share starts at exactly 0


def test_grouped_steps_follow_the_ramp():
    warmup = 100_000
    schedule = M.ModalitySchedule(mm_share=0.3, warmup_steps=warmup, grouping=True, seed=5)
    for start in range(0, warmup + N, N):  # ten 10,000-step windows of the ramp, then the plateau
        steps = np.arange(start, start + N)
        got = np.mean([schedule.row_modality(int(s), 0, 1) for s in steps])
        target = np.mean(0.3 * np.minimum(steps, warmup) / warmup)
        assert abs(got - target) <= TOL, (start, got, target)
    for s in (0, 17, warmup + 3):  # one decision per step: every row of a step agrees
        assert len({schedule.row_modality(s, r, 64) for r in range(64)}) == 1
        assert schedule.step_is_text_only(s) == (schedule.row_modality(s, 0, 64) == M.TEXT)


def test_sources_within_a_modality():
    weights = [w for k, w in M.PAPER_STAGE2_TABLE1.items() if k != "text"]
    picks = M.source_selection(weights, N)
    counts = collections.Counter(picks)
    for k, w in enumerate(weights):
        assert abs(counts[k] / N - w / sum(weights)) <= TOL
    # overall source shares after the modality split (7:3) stay within the tolerance too
    schedule = M.ModalitySchedule(mm_share=0.3)
    mm_rows = sum(schedule.row_modality(0, r, N) for r in range(N))
    for k, w in enumerate(weights):
        assert abs(mm_rows / N * counts[k] / N - 0.3 * w / sum(weights)) <= TOL


@pytest.fixture(scope="module")
def cheap_corpus(tmp_path_factory):
    """Two text-only sources (one declared multimodal): the whole pipeline runs without decoding."""
    d = tmp_path_factory.mktemp("mix")
    tok = synthetic.corpus_tokenizer(str(d / "tok"))
    rng = np.random.default_rng(0)
    R.write_records(str(d / "a"), [synthetic.text_record(rng, i, "a", 5) for i in range(40)])
    conv = [R.Record(f"b-{i}", "b", "sft", (R.text("what?", "user"), R.text("this", "assistant")))
            for i in range(40)]
    R.write_records(str(d / "b"), conv)
    c = [R.Record(f"c-{i}", "c", "caption", (R.text(synthetic.sentence(rng, 4)),)) for i in range(40)]
    R.write_records(str(d / "c"), c)
    sources = (M.SourceConfig("a", str(d / "a-*"), weight=0.7, modality="text"),
               M.SourceConfig("b", str(d / "b-*"), weight=0.2), M.SourceConfig("c", str(d / "c-*"), weight=0.1))
    return tok, sources


def test_record_stream_mixes_sources_in_their_weights(cheap_corpus):
    """Counted over many draws, the stream's sources follow the weights (within 5 binomial standard deviations:
    a chance failure of an honest random mix is below 1e-6; grain's exact-proportion mix is far closer), each
    draw is a record of the source it is tagged with, and each source's records come as whole epochs."""
    _, sources = cheap_corpus
    mm = [s for s in sources if s.modality == "multimodal"]
    n = 4000
    stream = L.record_stream(mm, M.MULTIMODAL, seed=0, process_index=0, process_count=1, num_epochs=None)
    draws = [stream[i] for i in range(n)]
    ids = collections.defaultdict(list)
    for d in draws:
        rec = R.deserialize(d["raw"])
        assert rec.source == d["source"] and rec.record_id.startswith(d["source"] + "-")
        ids[d["source"]].append(rec.record_id)
    total = sum(s.weight for s in mm)
    for s in mm:
        p = s.weight / total
        assert abs(len(ids[s.name]) / n - p) <= 5 * np.sqrt(p * (1 - p) / n), (s.name, len(ids[s.name]) / n, p)
        epochs = len(ids[s.name]) // 40  # 40 records a source: every whole epoch holds each exactly once
        assert epochs >= 2
        assert set(collections.Counter(ids[s.name][:40 * epochs]).values()) == {epochs}


@pytest.mark.parametrize("grouping", [False, True])
def test_pipeline_rows_follow_the_schedule(cheap_corpus, grouping):
    tok, sources = cheap_corpus
    dc = L.DataConfig(sources=sources, mm_warmup_steps=6, modality_grouping=grouping, max_examples_per_row=2)
    it = L.make_train_iterator(dc, C.tiny(), tok, batch_size=8, seq_len=160, seed=1, process_index=0,
                               process_count=1)
    text_task = it.task_vocabulary.index("text")
    seen = set()
    for step in range(12):
        text_only = it.step_is_text_only()
        batch = next(it)
        modalities = [it.schedule.row_modality(step, r, 8) for r in range(8)]
        for r, m in enumerate(modalities):
            tasks = set(batch["task_ids"][r][batch["segment_ids"][r] > 0].tolist())
            assert tasks and (tasks == {text_task}) == (m == M.TEXT), (step, r)
        if grouping:
            assert len(set(modalities)) == 1 and text_only == (modalities[0] == M.TEXT)
        if text_only:
            assert set(modalities) == {M.TEXT}
        seen.update(modalities)
    assert it.step == 12 and seen == {M.TEXT, M.MULTIMODAL}
