"""A LoRA run's analytic FLOPs (`flops.train_flops_per_step(lora_spec=...)`) count the adapters' matmuls: equal,
exactly, to every dot of the traced LoRA train step (the trainer's own `make_train_step`), for the common recipe
(LoRA on the LLM + the aligner in full), adapters in the vision tower's scanned blocks and on the aligner, and a
text-only step; and the adapters add what 2·r·(in + out) per token per adapted layer predicts."""
from __future__ import annotations

import jax
import pytest

from dsvl_jax import sharding
from dsvl_jax.config import tiny
from dsvl_jax.models import lora
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.state import abstract_state, param_shardings
from dsvl_jax.train import aot, flops, stages
from dsvl_jax.train.config_base import base
from dsvl_jax.train.optimizer import make_optimizer
from dsvl_jax.train.step import make_train_step

CASES = {
    "llm_plus_aligner_in_full": dict(targets=("llm",), full=("aligner/",)),
    "siglip_attn_aligner_llm_mlp_dropout": dict(targets=("siglip_attn", "adaptor", "llm_mlp"), dropout=0.1),
    "llm_text_only": dict(targets=("llm",), text_only=True),
}
BATCH, SEQ = 2, 32


def _traced_and_counted(cfg, spec, full, text_only):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, abstract = param_shardings(cfg, mesh)
    mask = stages.trainable_mask(abstract, full)
    tx, lr_fn = make_optimizer(base(cfg).optimizer, 100, mask)
    step = jax.jit(make_train_step(DeepseekVL(cfg), tx, mask, lr_fn, loss_chunk=512, text_only=text_only,
                                   lora_spec=spec), donate_argnums=0)
    state = abstract_state(cfg, mesh, tx, mask, spec)
    inputs = aot.abstract_batch(cfg, mesh, BATCH, SEQ, 1, text_only)
    with jax.set_mesh(mesh):
        traced = flops.traced_matmul_flops(step, state, inputs)
    count = flops.train_flops_per_step(cfg, batch_rows=BATCH, seq_len=SEQ, images_per_step=0 if text_only else BATCH,
                                       trainable_patterns=full, text_only=text_only, loss_chunk=512, lora_spec=spec)
    return traced, count


@pytest.mark.parametrize("name", sorted(CASES))
def test_analytic_lora_count_equals_the_traced_step(name):
    case = dict(CASES[name])
    cfg = tiny()
    spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=case.get("dropout", 0.0), targets=case["targets"])
    traced, count = _traced_and_counted(cfg, spec, case.get("full", ()), case.get("text_only", False))
    assert count["total_hardware"] == pytest.approx(traced, rel=1e-12)


def test_adapters_add_two_r_in_plus_out_per_token_forward():
    """The LLM's adapters alone (r = 4, the base frozen, text only), against the closed form: forward
    2·r·(in + out) per token per adapted layer; backward dB, dh, dA (2·r·(2·out + in)) and dX through A; the
    frozen decoder then pays its dX (the adapters give it a tangent), where without LoRA nothing had a backward."""
    cfg = tiny()
    c = cfg.text
    r, tokens = 4, BATCH * SEQ
    spec = lora.LoraSpec(rank=r, alpha=8.0, targets=("llm",))
    without = flops.train_flops_per_step(cfg, batch_rows=BATCH, seq_len=SEQ, images_per_step=0, trainable_patterns=(),
                                         text_only=True, loss_chunk=512)
    with_lora = flops.train_flops_per_step(cfg, batch_rows=BATCH, seq_len=SEQ, images_per_step=0,
                                           trainable_patterns=(), text_only=True, loss_chunk=512, lora_spec=spec)
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    fwd = sum(2 * tokens * r * (i + o) for i, o in shapes) * c.num_hidden_layers
    assert with_lora["forward"] - without["forward"] == fwd
    # backward: the adapters are trained in every layer, so the decoder's scan carry has a tangent in every
    # layer (lax.scan's rule): every adapter pays dB, dh, dA and its dX through A, the frozen base its dX, and
    # the attention products a gradient for both operands
    adapters_bwd = sum(2 * tokens * r * (2 * o + i) + 2 * tokens * r * i for i, o in shapes) * c.num_hidden_layers
    base_dx = sum(2 * tokens * i * o for i, o in shapes) * c.num_hidden_layers
    attention = 2 * 2 * 2 * BATCH * c.num_attention_heads * SEQ * SEQ * c.head_dim * c.num_hidden_layers
    lm_head_dx = 2 * tokens * d * c.vocab_size
    assert without["backward"] == 0
    assert with_lora["backward"] == adapters_bwd + base_dx + attention + lm_head_dx
