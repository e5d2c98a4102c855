"""The trainer on the tiny config: sharded = single device, frozen params stay bit-identical, the stage
1 → 2 → 3 chain trains exactly the paper's sets, stop/resume is bit-exact (data included)."""
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.train import stages
from dsvl_jax.train.trainer import train
from tests.helpers.record_log import logging_records
from tests.helpers.train_fixtures import checkpoint_state, tiny_config


def _params(workdir):
    return traverse_util.flatten_dict(load_orbax_params(workdir)[1], sep="/")


def _cfg(corpus, variant, **kw):
    srcs, tok = corpus
    base = dict(total_steps=3, log_every=1, **{"checkpoint.async_save": False})
    base.update(kw)
    return tiny_config(variant, srcs, tok, **base)


@pytest.mark.slow
def test_sharded_step_equals_single_device(corpus, tmp_path):
    one = train(_cfg(corpus, "stage2", **{"mesh.data": 1, "mesh.devices": 1}), str(tmp_path / "one"))
    eight = train(_cfg(corpus, "stage2", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path / "8"))
    assert abs(one["loss"] - eight["loss"]) <= 1e-5
    a, b = _params(tmp_path / "one"), _params(tmp_path / "8")
    assert a.keys() == b.keys()
    worst = max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_stage_chain_trains_exactly_the_paper_sets(corpus, tmp_path):
    """Stage 1 → 2 → 3, each from the previous stage's checkpoint: what changed is exactly the stage's set;
    everything else is bit-identical."""
    prev = None
    before = None
    for stage in (1, 2, 3):
        wd = str(tmp_path / f"s{stage}")
        kw = {"init.from_checkpoint": prev} if prev else {}
        if stage == 2:  # no modality warm-up here: its first steps are text-only and would not touch the adaptor
            kw["data.mm_warmup_steps"] = 0
        train(_cfg(corpus, f"stage{stage}", total_steps=3, **kw), wd)
        after = _params(wd)
        if before is None:  # stage 1 starts from the seed's init: recreate it for the comparison
            from dsvl_jax.state import init_params
            from dsvl_jax import sharding
            import jax
            mesh = sharding.make_mesh(-1, 1, 1)
            cfg0 = _cfg(corpus, "stage1")
            from dsvl_jax.train.validate import model_config
            before = traverse_util.flatten_dict(
                jax.device_get(init_params(model_config(cfg0), mesh, cfg0.seed)), sep="/")
        pats = stages.patterns_for(stage)
        changed = {k for k in after if not np.array_equal(np.asarray(after[k]), np.asarray(before[k]))}
        trainable = {k for k in after if stages.path_matches(k, pats) and not stages.path_matches(k, stages.UNUSED)}
        assert changed <= trainable, sorted(changed - trainable)[:5]
        # and every trainable tensor moved (step 0 has lr 0 in warm-up; the hd neck gets gradients once the
        # zero-initialised hd alpha has moved at step 1, so 3 steps move everything)
        assert changed == trainable, sorted(trainable - changed)[:10]
        before, prev = after, wd


@pytest.mark.heavy  # ~40 s; make test checks exact resume after a signal (below) and after SIGKILLs (crash safety)
def test_stop_and_resume_is_bit_identical(corpus, tmp_path):
    """config.stop_at_step stops (and saves) early on the full schedule; running again finishes it exactly as an
    uninterrupted run does."""
    k = 4  # 8 steps: the programs of the crash-safety test, served by the compilation cache
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    with logging_records(os.path.join(full, "records.0.log")):
        train(_cfg(corpus, "stage2", total_steps=2 * k), full)
    with logging_records(os.path.join(part, "records.0.log")):
        s1 = train(_cfg(corpus, "stage2", total_steps=2 * k, stop_at_step=k), part)
    assert s1["stopped_at"] == k and s1["step"] == k
    assert sorted(int(n) for n in os.listdir(os.path.join(part, "checkpoints")) if n.isdigit()) == [k]
    with logging_records(os.path.join(part, "records.0.log")):
        s2 = train(_cfg(corpus, "stage2", total_steps=2 * k), part)
    assert s2["step"] == 2 * k and "stopped_at" not in s2
    a, b = _params(full), _params(part)
    assert all(np.array_equal(np.asarray(a[x]), np.asarray(b[x])) for x in a)
    # the data: the same records in the same steps, none repeated or skipped
    logs = [[json.loads(l) for l in open(os.path.join(d, "records.0.log"))] for d in (full, part)]
    assert [r["codes"] for r in logs[0]] == [r["codes"] for r in logs[1]]
    codes = [c for r in logs[1] for c in r["codes"]]
    assert len(codes) == len(set(codes))


@pytest.mark.slow
def test_train_loop_never_syncs_implicitly(text_corpus, tmp_path, monkeypatch):
    """From the first step on, every transfer between host and device is explicit (the batch put on the mesh,
    jax.device_get at the logging and checkpoint steps, Orbax's saves): with jax_transfer_guard=disallow an
    implicit one raises. On CPU the guard sees host-to-device transfers only (a CPU array is read without a
    copy); on an accelerator it also catches a device read such as int(state["bad_steps"]) every step."""
    import jax
    from dsvl_jax.train import checkpointing
    real_arm = checkpointing.Preemption.arm

    def arm(self):  # called right before the loop
        real_arm(self)
        jax.config.update("jax_transfer_guard", "disallow")

    monkeypatch.setattr(checkpointing.Preemption, "arm", arm)
    try:
        s = train(_cfg(text_corpus, "stage2", total_steps=4, log_every=2, **{"checkpoint.every": 2,
                                                                              "checkpoint.async_save": True}),
                  str(tmp_path / "wd"))
    finally:
        jax.config.update("jax_transfer_guard", "allow")
    assert s["step"] == 4 and np.isfinite(s["loss"])


@pytest.mark.slow
def test_a_signal_inside_the_pipeline_saves_a_step_that_resumes_exactly(text_corpus, tmp_path, monkeypatch):
    """A signal while the packer is skipping records stops the batch half-read (packing.Interrupted): the data
    iterator goes back to where the step's batch began and the steps done are saved, so the run resumes
    exactly: the end state equals an uninterrupted run's, bit for bit."""
    from dsvl_jax.data import loader, packing
    cfg = lambda: _cfg(text_corpus, "stage2", total_steps=4, log_every=2)  # noqa: E731 (the guard test's program)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(cfg(), full)
    real_next = loader.MixtureBatchIterator.__next__

    def stuck_at_step_2(self):
        batch = real_next(self)  # the streams have moved on, as a packer stopped mid-batch leaves them
        if self.step == 3:
            raise packing.Interrupted("a signal while skipping")
        return batch

    monkeypatch.setattr(loader.MixtureBatchIterator, "__next__", stuck_at_step_2)
    s = train(cfg(), part)
    assert s["saved_step"] == 2 and s["step"] == 2 and s["signal"] == "SIGTERM"
    monkeypatch.setattr(loader.MixtureBatchIterator, "__next__", real_next)
    assert train(cfg(), part)["step"] == 4
    a, b = checkpoint_state(full, 4), checkpoint_state(part, 4)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
