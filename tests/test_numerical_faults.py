"""Numerical faults: a NaN in loss and gradients, an Inf in the loss alone, or a single Inf element in one
gradient leaf skips that step's update — params and optimizer state come out bit-identical to the state
before it — counts it in the metrics and training goes on; `max_bad_steps` non-finite steps in a row
stop the run with `TrainingDiverged`, whose message names a finished checkpoint holding the last good
params.

Both runs use the same fault schedule and step count, so they share one compiled step (text-only data:
one program)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.train.trainer import TrainingDiverged, train
from tests.helpers import faults
from tests.helpers.train_fixtures import checkpoint_state, tiny_config

NAN_STEPS = (1, 7, 8, 9)  # 1 alone; 7, 8, 9 in a row
INF_LOSS_STEPS = (3,)
INF_GRAD_STEPS = (5,)
TOTAL = 12
COUNTERS = ("step", "bad_steps", "skipped")


def _config(corpus, **kw):
    sources, tokenizer = corpus
    return tiny_config("stage2", sources, tokenizer, total_steps=TOTAL, log_every=1,
                       **{"checkpoint.every": 1, "checkpoint.keep": TOTAL + 1}, **kw)


@pytest.fixture
def faulty(monkeypatch):
    faults.inject(monkeypatch, nan_steps=NAN_STEPS, inf_loss_steps=INF_LOSS_STEPS, inf_grad_steps=INF_GRAD_STEPS)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _counter(state, name) -> int:
    return int(state[name])


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_training_goes_on(text_corpus, tmp_path, faulty):
    wd = str(tmp_path / "run")
    stop = 7  # steps 0..6: the three isolated faults, each followed by a good step
    summary = train(_config(text_corpus, stop_at_step=stop), wd)
    assert summary["stopped_at"] == stop and summary["skipped"] == 3
    states = {s: checkpoint_state(wd, s) for s in range(1, stop + 1)}
    bad = set(NAN_STEPS + INF_LOSS_STEPS + INF_GRAD_STEPS)
    for s in range(1, stop):  # step index s turns checkpoint s into checkpoint s + 1
        before, after = states[s], states[s + 1]
        tensors = [k for k in before if k.split("/")[0] not in COUNTERS]
        unchanged = [k for k in tensors if _same_bits(before[k], after[k])]
        if s in bad:  # nothing but the counters moved, and nothing non-finite got in
            assert len(unchanged) == len(tensors), sorted(set(tensors) - set(unchanged))[:5]
            assert _counter(after, "bad_steps") == 1
        else:  # a good step after a bad one updates again and resets the run of bad steps
            assert any(not _same_bits(before[k], after[k]) for k in tensors if k.startswith("params/"))
            assert _counter(after, "bad_steps") == 0
        assert all(np.isfinite(after[k]).all() for k in tensors if after[k].dtype.kind == "f")
        assert _counter(after, "skipped") == sum(1 for b in bad if b <= s)
    # metrics.jsonl: the running count, the bad step of each window, and no NaN in the logged loss
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train_rows = {r["step"]: r for r in rows if r.get("split") == "train"}
    assert [train_rows[d]["skipped_steps"] for d in range(1, stop + 1)] == [0, 1, 1, 2, 2, 3, 3]
    assert [train_rows[d]["bad_steps_in_window"] for d in range(1, stop + 1)] == [0, 1, 0, 1, 0, 1, 0]
    assert all(isinstance(train_rows[d]["loss"], float) for d in (1, 3, 5, 7))  # good windows: a number


@pytest.mark.slow
def test_bad_steps_in_a_row_stop_training_with_the_last_good_checkpoint(text_corpus, tmp_path, faulty):
    wd = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged) as err:
        train(_config(text_corpus, max_bad_steps=3), wd)
    # the isolated faults (1, 3, 5) did not count towards the limit; 7, 8, 9 did: it stops after step 9
    msg = str(err.value)
    m = re.fullmatch(r"3 non-finite steps in a row at step 10 \(limit config\.max_bad_steps=3\); the last good "
                     r"checkpoint is step (\d+) in (.+)", msg)
    assert m and m.group(2) == wd, msg
    named = int(m.group(1))
    finished = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
    assert named == finished[-1] == 9  # finished on disk; the diverged step 10 was never saved
    # its params are the last good ones (checkpoint 7, before the run of bad steps), bit for bit, and load
    _, named_params = load_orbax_params(wd, named)
    _, good_params = load_orbax_params(wd, 7)
    a, b = (traverse_util.flatten_dict(p, sep="/") for p in (named_params, good_params))
    assert a.keys() == b.keys() and all(_same_bits(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert all(np.isfinite(np.asarray(v)).all() for v in a.values())
