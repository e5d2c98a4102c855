"""Parameter counts of the released configs and the key names/shapes of both PyTorch layouts, checked
against the reference doc (official layout) and against transformers' own state_dict (HF port)."""
import math

import flax.linen as nn
import pytest
from flax import traverse_util

from dsvl_jax import config as C
from dsvl_jax.convert import keymap
from dsvl_jax.state import abstract_params


def _shapes(cfg):
    return traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)), sep="/")


def _torch_layout(cfg, layout):
    shapes = _shapes(cfg)
    out = {}
    for m in keymap.mappings(cfg, layout):
        per = [shapes[p].shape[1:] if m.layer is not None else shapes[p].shape for p in m.ours]
        out[m.torch_key] = keymap.torch_shape(m.kind, per, m.in_ndim, m.lead_ones)
    return out


@pytest.mark.parametrize("name,count", [("deepseek_vl_1p3b", 1_975_235_584), ("deepseek_vl_7b", 7_343_990_017)])
def test_released_parameter_counts(name, count):
    """Exact counts from jax.eval_shape, including the stored-but-unused MAP head and hybrid LayerNorms."""
    shapes = _shapes(C.preset(name))
    assert sum(math.prod(s.shape) for s in shapes.values()) == count
    # ...and the PyTorch layout stores exactly those numbers.
    assert sum(math.prod(s) for s in _torch_layout(C.preset(name), "official").values()) == count


def _official_7b_expected():
    """The 7B official state dict, written out from the reference doc §3 (not from our key map)."""
    e = {}
    sam = "vision_model.vision_tower_high.vision_tower."
    e[sam + "pos_embed"] = (1, 64, 64, 768)
    e[sam + "patch_embed.proj.weight"], e[sam + "patch_embed.proj.bias"] = (768, 3, 16, 16), (768,)
    for i in range(12):
        b = f"{sam}blocks.{i}."
        for n in ("norm1", "norm2"):
            e[b + n + ".weight"] = e[b + n + ".bias"] = (768,)
        e[b + "attn.qkv.weight"], e[b + "attn.qkv.bias"] = (2304, 768), (2304,)
        e[b + "attn.proj.weight"], e[b + "attn.proj.bias"] = (768, 768), (768,)
        rel = (127, 64) if i in (2, 5, 8, 11) else (27, 64)
        e[b + "attn.rel_pos_h"] = e[b + "attn.rel_pos_w"] = rel
        e[b + "mlp.lin1.weight"], e[b + "mlp.lin1.bias"] = (3072, 768), (3072,)
        e[b + "mlp.lin2.weight"], e[b + "mlp.lin2.bias"] = (768, 3072), (768,)
    for neck in ("neck", "neck_hd"):
        e[f"{sam}{neck}.0.weight"] = (256, 768, 1, 1)
        for j in (1, 3):
            e[f"{sam}{neck}.{j}.weight"] = e[f"{sam}{neck}.{j}.bias"] = (256,)
        e[f"{sam}{neck}.2.weight"] = (256, 256, 3, 3)
    e[sam + "downsamples.0.weight"], e[sam + "downsamples.1.weight"] = (512, 256, 3, 3), (1024, 512, 3, 3)
    e[sam + "hd_alpha_downsamples"] = (1,)
    e.update(_siglip_expected("vision_model.vision_tower_low.vision_tower."))
    for n in ("high_layer_norm", "low_layer_norm"):
        e[f"vision_model.{n}.weight"] = e[f"vision_model.{n}.bias"] = (1024,)
    e["aligner.high_up_proj.weight"] = e["aligner.low_up_proj.weight"] = (2048, 1024)
    e["aligner.high_up_proj.bias"] = e["aligner.low_up_proj.bias"] = (2048,)
    e["aligner.layers.1.weight"], e["aligner.layers.1.bias"] = (4096, 4096), (4096,)
    e.update(_llm_expected(4096, 11008, 30))
    return e


def _siglip_expected(p):
    e = {p + "pos_embed": (1, 576, 1024), p + "patch_embed.proj.weight": (1024, 3, 16, 16),
         p + "patch_embed.proj.bias": (1024,), p + "norm.weight": (1024,), p + "norm.bias": (1024,)}
    for i in range(24):
        b = f"{p}blocks.{i}."
        for n in ("norm1", "norm2"):
            e[b + n + ".weight"] = e[b + n + ".bias"] = (1024,)
        e[b + "attn.qkv.weight"], e[b + "attn.qkv.bias"] = (3072, 1024), (3072,)
        e[b + "attn.proj.weight"], e[b + "attn.proj.bias"] = (1024, 1024), (1024,)
        e[b + "mlp.fc1.weight"], e[b + "mlp.fc1.bias"] = (4096, 1024), (4096,)
        e[b + "mlp.fc2.weight"], e[b + "mlp.fc2.bias"] = (1024, 4096), (1024,)
    a = p + "attn_pool."
    e[a + "latent"] = (1, 1, 1024)
    e[a + "q.weight"], e[a + "q.bias"] = (1024, 1024), (1024,)
    e[a + "kv.weight"], e[a + "kv.bias"] = (2048, 1024), (2048,)
    e[a + "proj.weight"], e[a + "proj.bias"] = (1024, 1024), (1024,)
    e[a + "norm.weight"] = e[a + "norm.bias"] = (1024,)
    e[a + "mlp.fc1.weight"], e[a + "mlp.fc1.bias"] = (4096, 1024), (4096,)
    e[a + "mlp.fc2.weight"], e[a + "mlp.fc2.bias"] = (1024, 4096), (1024,)
    return e


def _llm_expected(h, inter, layers):
    p = "language_model.model."
    e = {p + "embed_tokens.weight": (102400, h), p + "norm.weight": (h,), "language_model.lm_head.weight": (102400, h)}
    for i in range(layers):
        b = f"{p}layers.{i}."
        for n in "qkvo":
            e[f"{b}self_attn.{n}_proj.weight"] = (h, h)
        e[b + "mlp.gate_proj.weight"] = e[b + "mlp.up_proj.weight"] = (inter, h)
        e[b + "mlp.down_proj.weight"] = (h, inter)
        e[b + "input_layernorm.weight"] = e[b + "post_attention_layernorm.weight"] = (h,)
    return e


def test_official_7b_keys_match_reference_doc():
    assert _torch_layout(C.deepseek_vl_7b(), "official") == _official_7b_expected()


def test_official_1p3b_keys_match_reference_doc():
    e = _siglip_expected("vision_model.vision_tower.")
    e["aligner.layers.0.weight"], e["aligner.layers.0.bias"] = (2048, 1024), (2048,)
    e["aligner.layers.2.weight"], e["aligner.layers.2.bias"] = (2048, 2048), (2048,)
    e.update(_llm_expected(2048, 5632, 24))
    assert _torch_layout(C.deepseek_vl_1p3b(), "official") == e


@pytest.mark.parametrize("hybrid", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_keys_match_transformers_state_dict(hybrid, tied):
    from tests.helpers.torch_ref import hf_config
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration
    cfg = C.tiny(hybrid=hybrid, tie_word_embeddings=tied)
    klass = DeepseekVLHybridForConditionalGeneration if hybrid else DeepseekVLForConditionalGeneration
    sd = klass(hf_config(cfg)).state_dict()
    want = {k: tuple(v.shape) for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    assert _torch_layout(cfg, "hf") == want


def test_real_7b_hf_layout_drops_only_the_unused_hybrid_norms():
    """The HF port has no place for the two never-used hybrid LayerNorms (4 × 1024 numbers); all else is there."""
    hf = _torch_layout(C.deepseek_vl_7b(), "hf")
    assert sum(math.prod(s) for s in hf.values()) == 7_343_990_017 - 4 * 1024
