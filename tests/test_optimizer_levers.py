"""The optimizer's from-scratch levers: weight decay on matrices only, and per-group learning-rate factors.

With zero gradients AdamW's update is exactly -lr * wd * param on decayed params and 0 elsewhere, so both
levers can be checked against hand arithmetic.
"""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsvl_jax.train.optimizer import make_optimizer


def _cfg(**kw):
    base = dict(lr=0.1, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                clip=0.0, mu_dtype="float32", lr_mult={})
    return ml_collections.ConfigDict(base | kw)


PARAMS = {"vision/siglip/blocks/fc1/kernel": jnp.full((2, 3), 2.0), "vision/siglip/blocks/fc1/bias": jnp.ones(3),
          "language_model/layers/q/kernel": jnp.full((3, 2), 4.0), "aligner/fc_0/bias": jnp.ones(2)}


def _update(cfg):
    tx, _ = make_optimizer(cfg, 10)
    zeros = {k: jnp.zeros_like(v) for k, v in PARAMS.items()}
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    return {k: np.asarray(v) for k, v in updates.items()}


def test_weight_decay_hits_matrices_only():
    u = _update(_cfg(weight_decay=0.5))
    np.testing.assert_allclose(u["vision/siglip/blocks/fc1/kernel"], -0.1 * 0.5 * 2.0)
    np.testing.assert_allclose(u["language_model/layers/q/kernel"], -0.1 * 0.5 * 4.0)
    assert not u["vision/siglip/blocks/fc1/bias"].any() and not u["aligner/fc_0/bias"].any()


def test_group_factor_scales_only_its_group():
    u = _update(_cfg(weight_decay=0.5, lr_mult={"siglip": 3.0}))
    np.testing.assert_allclose(u["vision/siglip/blocks/fc1/kernel"], -3 * 0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(u["language_model/layers/q/kernel"], -0.1 * 0.5 * 4.0, rtol=1e-6)


def test_unknown_group_is_named():
    with pytest.raises(ValueError, match="unknown group.*'vit'"):
        make_optimizer(_cfg(lr_mult={"vit": 2.0}), 10)


def test_config_takes_group_factors_and_names_a_bad_group():
    from dsvl_jax.config import VLMConfig
    from dsvl_jax.train import config_base, validate
    c = config_base.base(VLMConfig())
    c.optimizer.lr_mult = {"adaptor": 0.1}
    assert "optimizer.lr_mult.adaptor" not in validate._unknown_keys(c, config_base.base(VLMConfig()))
    c.optimizer.lrr = 1.0
    assert validate._unknown_keys(c, config_base.base(VLMConfig())) == ["optimizer.lrr"]
