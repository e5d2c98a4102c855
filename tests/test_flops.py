"""The analytic FLOP count of the train step (dsvl_jax/train/flops.py) against the programs JAX and XLA build.

Three checks, from exact to coarse:
1. Every dot/conv of the traced train step (scan bodies times their length, after dead-code elimination)
   equals the analytic hardware count exactly: all three stages, text-only batches, remat policies,
   grad accumulation, a padded loss chunk, SAM trained through its custom-vjp attention, the 1.3B layout,
   and the real 7B / 1.3B shapes (traced abstractly, nothing allocated).
2. The jaxpr counter itself equals XLA's cost analysis on loop-free dots and convs (fwd and bwd).
3. XLA's `cost_analysis()['flops']` of the compiled step (built as the trainer builds it) is within 10% of
   the analytic model count, on a config where every loop runs once (XLA counts a while body once) and
   matmuls dominate: head_dim 64 (a logit costs 4*64 matmul FLOPs against ~10 elementwise ones), width
   256, vocab 1024. XLA's excess is the elementwise work (norms, softmax, Adam): 2-4% here. In such a
   single-trip program XLA also merges the chunked loss's recomputed logits with the forward ones (CSE),
   so what it compiles is the model count, not model + recompute.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsvl_jax import sharding
from dsvl_jax.config import SamConfig, SiglipConfig, TextConfig, deepseek_vl_1p3b, deepseek_vl_7b, tiny
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import abstract_params, abstract_state, init_params, make_state, param_shardings
from dsvl_jax.train import aot, flops, stages
from dsvl_jax.train.config_base import base
from dsvl_jax.train.optimizer import make_optimizer
from dsvl_jax.train.step import make_train_step


def one_device_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def step_and_inputs(cfg, patterns, *, batch, seq_len, images, text_only=False, grad_accum=1, loss_chunk=512,
                    num_tasks=1):
    """The trainer's jitted step and abstract (state, batch) on a one-device mesh."""
    mesh = one_device_mesh()
    _, abstract = param_shardings(cfg, mesh)
    mask = stages.trainable_mask(abstract, patterns)
    tx, lr_fn = make_optimizer(base(cfg).optimizer, 100, mask)
    step = make_train_step(DeepseekVL(cfg), tx, mask, lr_fn, num_tasks=num_tasks, grad_accum=grad_accum,
                           loss_chunk=loss_chunk, text_only=text_only)
    state = abstract_state(cfg, mesh, tx, mask)
    inputs = aot.abstract_batch(cfg, mesh, batch, seq_len, images, text_only)
    return mesh, jax.jit(step, donate_argnums=0), state, inputs


def analytic(cfg, patterns, *, batch, seq_len, images, text_only=False, loss_chunk=512, num_tasks=1, **kw):
    return flops.train_flops_per_step(cfg, batch_rows=batch, seq_len=seq_len,
                                      images_per_step=0 if text_only else batch * images,
                                      trainable_patterns=patterns, text_only=text_only, loss_chunk=loss_chunk,
                                      num_tasks=num_tasks, **kw)


# ---------------------------------------------------------------------------------------------
# 1. analytic == traced dots/convs, exactly
# ---------------------------------------------------------------------------------------------
CASES = {
    "stage1": dict(stage=1),
    "stage2": dict(stage=2),
    "stage3": dict(stage=3),
    "stage1_text_only": dict(stage=1, text_only=True),  # nothing trainable is reached: forward only
    "stage2_text_only": dict(stage=2, text_only=True),
    "stage1_remat_full": dict(stage=1, remat="full"),
    "stage3_remat_dots_no_batch": dict(stage=3, remat="dots_no_batch"),
    "stage2_accum_padded_chunks_tasks": dict(stage=2, grad_accum=2, loss_chunk=24, num_tasks=3, images=2),
    "sam_trained_remat_full": dict(trainable=("sam",), remat="full"),  # backward through the custom-vjp kernel
    "sam_trained_reference_remat_dots_no_batch": dict(trainable=("sam",), remat="dots_no_batch", sam="reference"),
    "siglip_fc2_only": dict(trainable=("vision/siglip/blocks/fc2/",)),  # scan carry: dX down to layer 0
    "1p3b_layout_token_merge": dict(stage=3, hybrid=False, token_merge=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_analytic_count_equals_the_traced_step(name):
    case = dict(CASES[name])
    cfg = tiny(hybrid=case.pop("hybrid", True))
    if "remat" in case:
        cfg = cfg.replace(remat_policy=case.pop("remat"))
    if "token_merge" in case:
        cfg = cfg.replace(token_merge=case.pop("token_merge"))
    if "sam" in case:
        cfg = cfg.replace(sam_attention_impl=case.pop("sam"))
    patterns = stages.patterns_for(case.pop("stage", None), case.pop("trainable", ()))
    kw = dict(batch=4, seq_len=64, images=case.pop("images", 1), **case)
    mesh, step, state, inputs = step_and_inputs(cfg, patterns, **kw)
    with jax.set_mesh(mesh):
        traced = flops.traced_matmul_flops(step, state, inputs)
    counted = analytic(cfg, patterns, **{k: v for k, v in kw.items() if k != "grad_accum"})
    assert counted["total_hardware"] == pytest.approx(traced, rel=1e-12)
    assert counted["total"] <= counted["total_hardware"]


@pytest.mark.parametrize("preset, stage", [("7b", 2), ("1p3b", 1)])
def test_analytic_count_equals_the_traced_step_at_real_shapes(preset, stage):
    """Real widths, SAM at 1024 px (64x64 map, 14x14 windows over the padded 70x70 = 25 windows), one
    4,096-token row with one image; traced on abstract inputs (nothing of the model is allocated)."""
    cfg = (deepseek_vl_7b() if preset == "7b" else deepseek_vl_1p3b()).replace(dtype="bfloat16",
                                                                              remat_policy="dots_no_batch")
    patterns = stages.patterns_for(stage)
    mesh, step, state, inputs = step_and_inputs(cfg, patterns, batch=1, seq_len=4096, images=1)
    with jax.set_mesh(mesh):
        traced = flops.traced_matmul_flops(step, state, inputs)
    counted = analytic(cfg, patterns, batch=1, seq_len=4096, images=1)
    assert counted["total_hardware"] == pytest.approx(traced, rel=1e-12)


def test_trained_decoder_is_six_flops_per_param_per_token_plus_attention():
    """The textbook closed form, independent of the per-layer walk: a fully trained decoder costs 6 FLOPs
    per matmul parameter per token, plus attention 3 x 2 x 2 x B x T^2 x heads x head_dim per layer."""
    cfg = deepseek_vl_7b()
    b, t = 2, 4096
    params = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)), sep="/")
    matmul = sum(math.prod(v.shape) for k, v in params.items()
                 if k.startswith("language_model/layers/") and "layernorm" not in k)
    c = cfg.text
    attention = 3 * 4 * b * t * t * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    got = analytic(cfg, stages.patterns_for(2), batch=b, seq_len=t, images=0, text_only=True)
    assert got["llm"] == 6 * matmul * b * t + attention
    assert got["llm_attention"] == attention
    assert got["lm_head"] == 3 * 2 * b * t * c.hidden_size * c.vocab_size + 4 * b * t  # + per-task sums
    assert got["total_causal"] == got["total"] - attention / 2
    packed = analytic(cfg, stages.patterns_for(2), batch=b, seq_len=t, images=0, text_only=True,
                      mean_segment_len=t / 4)
    assert packed["total_packed"] == got["total"] - attention + attention / 4 / 2


def test_frozen_towers_pay_a_forward_only_and_stage1_pays_dx_through_the_llm():
    cfg = deepseek_vl_7b()
    kw = dict(batch=2, seq_len=4096, images=1)
    s1, s2, s3 = (analytic(cfg, stages.patterns_for(s), **kw) for s in (1, 2, 3))
    assert s1["sam"] == s2["sam"] == s3["sam"]  # frozen SAM blocks: forward; the trained neck/downsample same
    assert s1["siglip"] == s2["siglip"] < s3["siglip"]
    # stage 1: frozen LLM, but dX through every layer for the aligner's gradient: its weight matmuls cost
    # 2x their forward; stage 2 adds dW: 3x. Attention (no weights) costs 3x its forward in both.
    a = s1["llm_attention"]
    assert a == s2["llm_attention"] > 0
    assert (s1["llm"] - a) * 3 == (s2["llm"] - a) * 2
    text = analytic(cfg, stages.patterns_for(1), text_only=True, **kw)
    assert text["backward"] == 0 and text["siglip"] == text["sam"] == 0


@pytest.mark.parametrize("kind, tflops", [("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459),
                                          ("TPU v6 lite", 918), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989)])
def test_peak_by_device_kind(kind, tflops):
    """device_kind strings as JAX reports them (v5p chips say "TPU v5"; v5e "TPU v5 lite")."""
    assert flops.peak_flops_per_device(kind) == tflops * 1e12


def test_peak_override_cpu_and_mfu():
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", override_tflops=2.5) == 2.5e12
    assert flops.peak_flops_per_device("TPU v5", override_tflops=100) == 100e12
    assert flops.mfu(4.59e14, 1.0, 2, 459e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, 1, None) is None and flops.mfu(1e12, 0.0, 1, 1e12) is None


def test_bad_arguments_are_named():
    kw = dict(batch_rows=2, seq_len=64, images_per_step=2, trainable_patterns=stages.patterns_for(2))
    for key, bad in (("batch_rows", 0), ("seq_len", 1.5), ("images_per_step", -1)):
        with pytest.raises(ValueError, match=key):
            flops.train_flops_per_step(tiny(), **dict(kw, **{key: bad}))
    with pytest.raises(ValueError, match="remat_policy"):
        flops.train_flops_per_step(tiny().replace(remat_policy="sometimes"), **kw)


# ---------------------------------------------------------------------------------------------
# 2. the jaxpr counter against XLA on loop-free programs
# ---------------------------------------------------------------------------------------------
def _xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("size, kernel, stride, pad", [(16, 3, 2, 1), (16, 3, 1, 1), (9, 1, 1, 0), (32, 8, 8, 0)])
def test_conv_count_matches_xla_forward_and_backward(size, kernel, stride, pad):
    """Valid taps only (padding and the stride holes of the transposed conv are not multiplies), as XLA."""
    x, w = jnp.ones((2, size, size, 8)), jnp.ones((kernel, kernel, 8, 16))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    ct = jnp.ones(jax.eval_shape(conv, x, w).shape)
    grads = lambda x, w, ct: jax.vjp(conv, x, w)[1](ct)
    assert flops.traced_matmul_flops(conv, x, w) == _xla_flops(conv, x, w)
    assert flops.traced_matmul_flops(grads, x, w, ct) == _xla_flops(grads, x, w, ct)
    out = (size + 2 * pad - kernel) // stride + 1
    assert flops.traced_matmul_flops(conv, x, w) == 2 * 2 * 16 * 8 * flops.conv_valid_taps(size, kernel, stride, pad) ** 2
    assert flops.conv_valid_taps(size, kernel, stride, pad) <= out * kernel


def test_dot_count_matches_xla_and_scans_multiply():
    q, k = jnp.ones((2, 128, 2, 2, 64)), jnp.ones((2, 128, 2, 64))
    gqa = lambda q, k: jnp.einsum("btkgd,bskd->bkgts", q, k)
    assert flops.traced_matmul_flops(gqa, q, k) == _xla_flops(gqa, q, k) == 2 * 2 * 4 * 128 * 128 * 64

    def stack(x, w):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

    x, w = jnp.ones((16, 32)), jnp.ones((5, 32, 32))
    assert flops.traced_matmul_flops(stack, x, w) == 5 * 2 * 16 * 32 * 32
    assert _xla_flops(stack, x, w) < 2 * 2 * 16 * 32 * 32  # XLA: the loop body once


# ---------------------------------------------------------------------------------------------
# 3. XLA's cost analysis of the compiled step, built as the trainer builds it
# ---------------------------------------------------------------------------------------------
def single_trip_config():
    """Every loop runs once (1 LM layer, 1 SigLIP layer, one loss chunk, SAM's global block in one query
    block) and matmuls dominate the elementwise work XLA also counts."""
    return tiny().replace(
        text=TextConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512),
        siglip=SiglipConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8),
        sam=SamConfig(hidden_size=128, mlp_dim=256, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                      patch_size=8, window_size=3, global_attn_indexes=(1,), output_channels=32))


@pytest.fixture(scope="module")
def single_trip_params():
    cfg = single_trip_config()
    mesh = one_device_mesh()
    return cfg, mesh, init_params(cfg, mesh, seed=0)


def _real_batch(cfg, mesh, b, t, images, text_only):
    out = {}
    for k, v in aot.abstract_batch(cfg, mesh, b, t, images, text_only).items():
        out[k] = jax.device_put(np.zeros(v.shape, v.dtype), v.sharding)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage, text_only", [(1, False), (2, False), (3, False), (2, True)])
def test_xla_cost_analysis_of_the_compiled_step_agrees(single_trip_params, stage, text_only):
    cfg, mesh, params = single_trip_params
    b, t, images = 2, 128, 1
    patterns = stages.patterns_for(stage)
    _, abstract = param_shardings(cfg, mesh)
    mask = stages.trainable_mask(abstract, patterns)
    tx, lr_fn = make_optimizer(base(cfg).optimizer, 100, mask)
    state = make_state(params, tx, mask, mesh, cfg)
    step = jax.jit(make_train_step(DeepseekVL(cfg), tx, mask, lr_fn, loss_chunk=512, text_only=text_only),
                   donate_argnums=0)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, _real_batch(cfg, mesh, b, t, images, text_only)).compile()
    xla = compiled.cost_analysis()["flops"]
    counted = analytic(cfg, patterns, batch=b, seq_len=t, images=images, text_only=text_only)
    assert abs(xla / counted["total"] - 1) < 0.10, (xla, counted)
