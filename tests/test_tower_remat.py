"""Per-tower remat policies (`remat_policy_sam`, `_siglip`, `_llm`; empty = `remat_policy`).

What a tower's policy changes is what its backward keeps: the residuals of the vjp, which the compiled step
must hold from the forward to the backward (its activation memory). Counted here without computing anything
(`jax.eval_shape` of the vjp closure's leaves) on the tiny 7B-layout model: full remat of one tower drops
that tower's residuals and only those; a tower's own policy overrides the default. (The CPU compiler's
memory_analysis is no measure here: its temp bytes rose with full SAM remat on this model.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from dsvl_jax import config as C
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import abstract_params

ROWS, SLOTS = 2, 2


def residual_bytes(cfg: C.VLMConfig) -> int:
    """Bytes the backward of mean(logits²) keeps from the forward (params and inputs excluded)."""
    model = DeepseekVL(cfg)
    params = nn.meta.unbox(abstract_params(cfg))
    t = SLOTS * cfg.num_image_tokens + 16
    s, hs = cfg.siglip.image_size, cfg.sam.image_size
    ids = jax.ShapeDtypeStruct((ROWS, t), jnp.int32)
    pv = jax.ShapeDtypeStruct((ROWS, SLOTS, 3, s, s), jnp.float32)
    hv = jax.ShapeDtypeStruct((ROWS, SLOTS, 3, hs, hs), jnp.float32)
    valid = jax.ShapeDtypeStruct((ROWS, SLOTS), jnp.bool_)

    def residuals(p, ids, pv, hv, valid):
        def loss(p):
            logits = model.apply({"params": p}, ids, pixel_values=pv, high_res_pixel_values=hv, image_valid=valid)
            return jnp.mean(jnp.square(logits))
        return jax.tree.leaves(jax.vjp(loss, p)[1])

    leaves = jax.eval_shape(residuals, params, ids, pv, hv, valid)
    inputs = {(x.shape, x.dtype) for x in jax.tree.leaves(params) + [ids, pv, hv, valid]}
    return sum(x.size * x.dtype.itemsize for x in leaves if (x.shape, x.dtype) not in inputs)


@pytest.fixture(scope="module")
def sizes():
    tiny = C.tiny()  # one block a tower is enough (SAM's a global one): tracing cost is per block
    base = tiny.replace(sam_attention_impl="reference",
                        text=C.dataclasses.replace(tiny.text, num_hidden_layers=1),
                        siglip=C.dataclasses.replace(tiny.siglip, num_hidden_layers=1),
                        sam=C.dataclasses.replace(tiny.sam, num_hidden_layers=1, global_attn_indexes=(0,)))
    variants = {"none": {}, "sam": dict(remat_policy_sam="full"), "siglip": dict(remat_policy_siglip="full"),
                "llm": dict(remat_policy_llm="full"), "all_but_sam": dict(remat_policy="full", remat_policy_sam="none")}
    return {k: residual_bytes(base.replace(**v)) for k, v in variants.items()}


def test_full_remat_of_one_tower_drops_that_towers_residuals(sizes):
    saved = {t: sizes["none"] - sizes[t] for t in ("sam", "siglip", "llm")}
    assert all(v > 0 for v in saved.values()), sizes
    assert saved["sam"] > saved["siglip"], sizes  # SAM's 4x larger image holds more than SigLIP


def test_a_tower_policy_overrides_the_default(sizes):
    # full by default, SAM "none": SigLIP's and the LLM's residuals go, SAM's all stay (and nothing else moves)
    assert sizes["all_but_sam"] == sizes["none"] - (sizes["none"] - sizes["siglip"]) - (sizes["none"] - sizes["llm"])


def test_bad_tower_policy_names_the_key():
    with pytest.raises(ValueError, match=r"remat_policy_sam='fast': expected one of"):
        C.tiny().replace(remat_policy_sam="fast")
    assert C.tiny().replace(remat_policy="dots", remat_policy_llm="full").tower_remat("sam") == "dots"
    assert C.tiny().replace(remat_policy="dots", remat_policy_llm="full").tower_remat("llm") == "full"
