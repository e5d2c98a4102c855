"""A LoRA train step on the smallest config (SigLIP-only, one layer per tower, 8 rows × 24 tokens with an image,
two steps), cheap enough for `make test`: on an 8-device mesh it equals one device (≤ 1e-5) and returns the
state on the shardings a resume restores onto; a LoRA checkpoint — each step's state without the frozen base,
the base written once to lora_base — resumes bit-identically; one written before that split (the whole params
in the step) still resumes. The resume runs on one device: Orbax's first save of a sharded state compiles a
slice per replica and shape (~10 s here). (tests/test_lora_run.py repeats both through the trainer, marked
heavy.)"""
from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import tiny
from dsvl_jax.convert import orbax_io
from dsvl_jax.data.loader import global_batch
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import abstract_state, init_adapters, init_params, make_state, param_shardings
from dsvl_jax.train import stages
from dsvl_jax.train.checkpointing import Checkpointer
from dsvl_jax.train.config_base import base
from dsvl_jax.train.optimizer import make_optimizer
from dsvl_jax.train.step import jit_train_step, make_train_step
from tests.helpers.train_fixtures import orbax_tree

SPEC = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1, targets=("llm", "siglip_attn"))
FULL = ("aligner/",)  # trained in full beside the adapters (the common VLM recipe)
ROWS, SEQ, STEPS = 8, 24, 2
MESH_TOL = 1e-5  # the bound; Adam scales float rounding of the sharded sums by lr (2e-4 here): ~1e-8


def _cfg():
    c = tiny(hybrid=False)
    return c.replace(text=dataclasses.replace(c.text, num_hidden_layers=1),
                     siglip=dataclasses.replace(c.siglip, num_hidden_layers=1))


def _batch(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.image_token_id, (ROWS, SEQ)).astype(np.int32)
    ids[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_id
    s = cfg.siglip.image_size
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "positions": np.tile(np.arange(SEQ), (ROWS, 1)),
            "segment_ids": np.ones((ROWS, SEQ), np.int32), "task_ids": np.zeros((ROWS, SEQ), np.int32),
            "loss_mask": (ids != cfg.image_token_id).astype(np.float32),
            "pixel_values": rng.standard_normal((ROWS, 1, 3, s, s)).astype(np.float32),
            "image_mask": np.ones((ROWS, 1), bool)}


class Run:
    """The trainer's pieces for a LoRA run of `_cfg()` on `mesh`: mask, optimizer, jitted step, fresh state."""

    def __init__(self, mesh):
        self.cfg, self.mesh = _cfg(), mesh
        _, abstract = param_shardings(self.cfg, mesh)
        self.mask = stages.trainable_mask(abstract, FULL)
        opt = base(self.cfg).optimizer
        opt.warmup_steps = 0
        self.tx, lr_fn = make_optimizer(opt, 100, self.mask)
        self.step = jit_train_step(make_train_step(DeepseekVL(self.cfg), self.tx, self.mask, lr_fn, loss_chunk=64,
                                                   lora_spec=SPEC, seed=3), self.abstract())  # as the trainer
        self.batch = global_batch(_batch(self.cfg), mesh)

    def fresh(self, like=None):
        """A fresh state; from another Run's fresh state (the same values) by placing them, not by compiling
        the inits again."""
        if like is not None:
            return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x), a.sharding), jax.device_get(like),
                                self.abstract())
        return make_state(init_params(self.cfg, self.mesh, 0), self.tx, self.mask, self.mesh, self.cfg,
                          init_adapters(self.cfg, self.mesh, SPEC, 1), SPEC)

    def abstract(self):
        return abstract_state(self.cfg, self.mesh, self.tx, self.mask, SPEC)

    def steps(self, state, n):
        with jax.set_mesh(self.mesh):
            for _ in range(n):
                state, m = self.step(state, self.batch)
        return state, float(m["loss"])


def _flat(state):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(state), sep="/").items()
            if not isinstance(v, tuple)}


@pytest.fixture(scope="module")
def one():
    run = Run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    run.start = jax.device_get(run.fresh())
    return run


def test_eight_devices_equal_one(one):
    eight = Run(sharding.make_mesh(2, 2, 2))
    a, loss_a = eight.steps(eight.fresh(like=one.start), STEPS)
    b, loss_b = one.steps(one.fresh(like=one.start), STEPS)
    # each step hands the state back on the shardings a resume restores onto (one program for all steps)
    target = traverse_util.flatten_dict(eight.abstract(), sep="/")
    for k, v in traverse_util.flatten_dict(a, sep="/").items():
        if not isinstance(v, tuple):
            assert v.sharding.is_equivalent_to(target[k].sharding, v.ndim), (k, v.sharding, target[k].sharding)
    assert abs(loss_a - loss_b) <= MESH_TOL
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("params/", "lora/")):
            assert float(np.abs(a[k].astype(np.float64) - b[k]).max()) <= MESH_TOL, k
    # the bound tells: both A and B moved by ~lr per step, far more than it (dropout masks, adapter shardings)
    fresh = _flat({"lora": one.start["lora"]})
    moved = {k: float(np.abs(a[k] - fresh[k]).max()) for k in fresh}
    assert min(moved.values()) > 10 * MESH_TOL, moved


def _walk(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getmtime(os.path.join(d, f))
            for d, _, fs in os.walk(folder) for f in fs}


def test_resume_is_bit_identical_and_steps_hold_no_base(one, tmp_path):
    wd = str(tmp_path / "run")
    state, _ = one.steps(one.fresh(like=one.start), 1)
    ckpt = Checkpointer(wd, every=1, keep=2, async_save=False, frozen_mask=one.mask)
    ckpt.save(1, state, force=True)
    base_files = _walk(os.path.join(wd, "lora_base"))
    state, _ = one.steps(state, 1)
    ckpt.save(2, state, force=True)
    ckpt.close()
    straight = _flat(one.steps(state, 1)[0])

    # the base is written once (the second save left it as it was) and holds every frozen param ...
    assert _walk(os.path.join(wd, "lora_base")) == base_files
    frozen = {k for k, m in traverse_util.flatten_dict(one.mask, sep="/").items() if not m}
    assert {k[len("params/"):] for k in orbax_tree(os.path.join(wd, "lora_base"))} == frozen
    # ... and a step's state holds only what trains: the aligner, the adapters, their optimizer state, counters
    step2 = orbax_tree(os.path.join(wd, "checkpoints", "2", "state"))
    assert {k.split("/")[0] for k in step2} == {"step", "params", "opt_state", "lora", "bad_steps", "skipped"}
    assert {k for k in step2 if k.startswith("params/")} and all(k.startswith("params/aligner/") for k in step2
                                                                 if k.startswith("params/"))

    again = Checkpointer(wd, every=1, keep=2, async_save=False, frozen_mask=one.mask)
    resumed = _flat(one.steps(again.restore(2, one.abstract()), 1)[0])
    again.close()
    assert resumed.keys() == straight.keys()
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_a_checkpoint_with_the_whole_params_still_resumes_then_splits(one, tmp_path):
    """A LoRA workdir written before the split (the frozen params in each step, no lora_base) resumes as it was;
    its next save writes the base; the converter reads both. Without the base, a split step is a clear error."""
    wd = str(tmp_path / "old")
    state = one.fresh(like=one.start)
    want = _flat(state)
    old = Checkpointer(wd, every=1, keep=3, async_save=False)  # no frozen_mask: everything in the step
    old.save(1, state, force=True)
    old.close()
    orbax_io.write_model_config(wd, one.cfg)
    assert not os.path.exists(os.path.join(wd, "lora_base"))
    ckpt = Checkpointer(wd, every=1, keep=3, async_save=False, frozen_mask=one.mask)
    back = ckpt.restore(1, one.abstract())
    got = _flat(back)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ckpt.save(2, back, force=True)
    ckpt.close()
    assert os.path.isdir(os.path.join(wd, "lora_base"))
    params = {k[len("params/"):]: v for k, v in want.items() if k.startswith("params/")}
    for step in (1, 2):
        _, read = orbax_io.load_orbax_params(wd, step)
        read = traverse_util.flatten_dict(read, sep="/")
        assert read.keys() == params.keys()
        for k in params:
            np.testing.assert_array_equal(read[k], params[k], err_msg=f"step {step}: {k}")
    shutil.rmtree(os.path.join(wd, "lora_base"))
    with pytest.raises(orbax_io.OrbaxError, match=r"frozen base they need, .*lora_base, is missing"):
        orbax_io.OrbaxSource(wd, 2)
    with pytest.raises(orbax_io.OrbaxError, match=r"lora_base: missing; a LoRA run's checkpoints hold only"):
        Checkpointer(wd, every=1, keep=3, frozen_mask=one.mask).saved_param_shapes(2)
