"""Storage faults at save time: the workdir becomes unwritable, or the disk fills up, just before a
checkpoint is written. The run stops with a `CheckpointSaveError` that names the checkpoint folder and
the OS error; the previous checkpoint is untouched (same files, same bytes) and is what a restart
resumes from; and the resumed run re-creates, bit for bit, the state the failed save was writing.

Faults are real I/O errors in this process: "unwritable" removes write permission from the checkpoint
folder (and, for root, to whom permissions do not apply, drops the effective uid to `nobody` while the
fault lasts); "full" lowers RLIMIT_FSIZE, so writes past 64 KB fail with EFBIG as a full or over-quota
disk would fail them (a real ENOSPC needs a small filesystem, which needs root to mount).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import stat

import jax
import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.train import checkpointing
from dsvl_jax.train.checkpointing import CheckpointSaveError
from dsvl_jax.train.trainer import train
from tests.helpers.train_fixtures import tiny_config

TOTAL = 3
FAULT_AT = 2  # the save of checkpoint 2 meets the fault; checkpoint 1 is the previous one
NOBODY = 65534
MESSAGES = {"unwritable": "Permission denied", "full": "File too large"}


def _config(corpus):
    sources, tokenizer = corpus
    return tiny_config("stage2", sources, tokenizer, total_steps=TOTAL, log_every=1,
                       **{"checkpoint.every": 1, "checkpoint.keep": TOTAL + 1})


def _fingerprint(folder: str) -> dict:
    out = {}
    for here, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(here, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@contextlib.contextmanager
def _unwritable(folder: str):
    mode = os.stat(folder).st_mode
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(NOBODY)  # applies to every thread of the process, Orbax's and tensorstore's too
        yield
    finally:
        if as_root:
            os.seteuid(0)
        os.chmod(folder, mode)


@contextlib.contextmanager
def _full(limit: int = 64 * 1024):
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["unwritable", "full"])
def test_save_fault_gives_clear_error_and_keeps_previous_checkpoint(text_corpus, tmp_path, monkeypatch, fault):
    wd = str(tmp_path / "run")
    ckdir = os.path.join(wd, "checkpoints")
    real_save = checkpointing.Checkpointer.save
    seen = {}
    stack = contextlib.ExitStack()

    def save_with_fault(self, step, state, data_iter=None, *, force=False):
        if step == FAULT_AT:  # the fault starts now and lasts until the run has stopped
            self.wait()  # the previous (async) save is finished: the fault meets this save, not that one
            seen["previous"] = _fingerprint(os.path.join(ckdir, str(FAULT_AT - 1)))
            assert seen["previous"], "the previous checkpoint is not on disk"
            seen["params"] = _flat(jax.device_get(state["params"]))  # what this save was meant to write
            stack.enter_context(_unwritable(ckdir) if fault == "unwritable" else _full())
        return real_save(self, step, state, data_iter, force=force)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_with_fault)
    with stack, pytest.raises(CheckpointSaveError) as err:
        train(_config(text_corpus), wd)
    msg = str(err.value)
    assert f"checkpoint {FAULT_AT} under {ckdir} failed" in msg and MESSAGES[fault] in msg, msg
    print(f"\n{fault} workdir at save time: {msg}")
    assert "params" in seen, "the fault was never applied"

    # the previous checkpoint: byte for byte what it was, and the newest finished one
    assert _fingerprint(os.path.join(ckdir, str(FAULT_AT - 1))) == seen["previous"]
    assert sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) == [FAULT_AT - 1]
    _, params = load_orbax_params(wd)
    assert all(np.isfinite(v).all() for v in _flat(params).values())

    # storage is back: the restart resumes from it and re-creates the state the failed save held
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    summary = train(_config(text_corpus), wd)
    assert summary["step"] == TOTAL
    _, redone = load_orbax_params(wd, FAULT_AT)
    redone = _flat(redone)
    assert redone.keys() == seen["params"].keys()
    assert all(redone[k].tobytes() == seen["params"][k].tobytes() for k in redone)
