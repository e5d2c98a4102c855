"""`config.json` of both PyTorch layouts ↔ `VLMConfig`.

HF port: `model_type` `deepseek_vl` / `deepseek_vl_hybrid` with `text_config` (llama),
`vision_config` (siglip_vision_model) and, for the hybrid, `high_res_vision_config` (sam_vision_model).
Official: `model_type` `multi_modality` with `vision_config` {cls, params}, `aligner_config` {cls,
params} and `language_config` (a LlamaConfig; absent fields take LlamaConfig's defaults).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dsvl_jax.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, SamConfig, SiglipConfig, TextConfig, VLMConfig
from dsvl_jax.errors import ConfigError

HF_MODEL_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")
OFFICIAL_MODEL_TYPE = "multi_modality"

# LlamaConfig defaults (transformers) for fields the official `language_config` leaves out.
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, rope_theta=10000.0)

# Tower architectures the official code knows by name (siglip_vit.py / sam.py).
_SIGLIP_NAMED = {
    "siglip_large_patch16_384": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                                     intermediate_size=4096),
}
_SAM_NAMED = {
    "sam_b_downsample": dict(hidden_size=768, mlp_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                             patch_size=16, window_size=14, global_attn_indexes=(2, 5, 8, 11), output_channels=256),
}
_ARCH_KEY = "dsvl_jax_arch"  # our extension: full tower fields for sizes the official code has no name for


def _text_from_llama(d: dict, where: str) -> TextConfig:
    d = {**_LLAMA_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k not in _LLAMA_DEFAULTS}}
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ConfigError(f"{where}: attention/MLP biases are not part of DeepSeek-LLM")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"{where}: rope_type {rope.get('rope_type')!r} is not supported (DeepSeek-LLM uses plain RoPE)")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    heads = d["num_attention_heads"]
    return TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=d["num_key_value_heads"] or heads, head_dim=d["head_dim"] or d["hidden_size"] // heads,
        max_position_embeddings=d["max_position_embeddings"], rope_theta=float(theta),
        rms_norm_eps=d["rms_norm_eps"], hidden_act=d["hidden_act"])


def _text_to_llama(t: TextConfig, tie: bool) -> dict:
    return dict(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=t.head_dim, max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                hidden_act=t.hidden_act, rope_theta=t.rope_theta,
                rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"},
                attention_bias=False, mlp_bias=False, tie_word_embeddings=tie,
                # DeepSeek's tokenizer ids; small test vocabularies have none.
                **(dict(bos_token_id=100000, eos_token_id=100001) if t.vocab_size > 100001 else {}))


# ---------------------------------------------------------------------------------------------
# HF port
# ---------------------------------------------------------------------------------------------
def from_hf(d: dict, where: str = "config.json") -> VLMConfig:
    mt = d.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {mt!r} is not an HF DeepSeek-VL type {HF_MODEL_TYPES}")
    hybrid = mt == "deepseek_vl_hybrid"
    for key in ("text_config", "vision_config") + (("high_res_vision_config",) if hybrid else ()):
        if not isinstance(d.get(key), dict):
            raise ConfigError(f"{where}: missing or malformed {key!r}")
    v = d["vision_config"]
    siglip = SiglipConfig(
        hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
        num_hidden_layers=v.get("num_hidden_layers", 12), num_attention_heads=v.get("num_attention_heads", 12),
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16), num_channels=v.get("num_channels", 3),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6), hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        use_head=v.get("vision_use_head", True))
    sam = None
    if hybrid:
        s = d["high_res_vision_config"]
        if not s.get("use_abs_pos", True) or not s.get("use_rel_pos", True):
            raise ConfigError(f"{where}: SAM without absolute/relative positions is not DeepSeek-VL's encoder")
        sam = SamConfig(
            hidden_size=s.get("hidden_size", 768), mlp_dim=s.get("mlp_dim", 3072),
            num_hidden_layers=s.get("num_hidden_layers", 12), num_attention_heads=s.get("num_attention_heads", 12),
            image_size=s.get("image_size", 1024), patch_size=s.get("patch_size", 16),
            num_channels=s.get("num_channels", 3), window_size=s.get("window_size", 14),
            global_attn_indexes=tuple(s.get("global_attn_indexes", (2, 5, 8, 11))),
            output_channels=s.get("output_channels", 256), layer_norm_eps=s.get("layer_norm_eps", 1e-6),
            hidden_act=s.get("hidden_act", "gelu"), qkv_bias=s.get("qkv_bias", True))
    tie = bool(d.get("tie_word_embeddings", True))
    return VLMConfig(text=_text_from_llama(d["text_config"], f"{where}: text_config"), siglip=siglip, sam=sam,
                     adapter="low_high_hybrid_split_mlp_gelu" if hybrid else "mlp_gelu", adapter_depth=2,
                     image_token_id=d.get("image_token_id", 100015), tie_word_embeddings=tie)


def to_hf(cfg: VLMConfig, dtype: str = "float32") -> dict:
    if cfg.adapter_depth != 2 or cfg.adapter not in ("mlp_gelu", "low_high_hybrid_split_mlp_gelu"):
        raise ConfigError(f"the HF port has no layout for adapter {cfg.adapter!r} with depth {cfg.adapter_depth}")
    if cfg.token_merge != 1:
        raise ConfigError("the HF port has no visual-token merge: export a model with token_merge=1")
    s = cfg.siglip
    out: dict[str, Any] = {
        "architectures": ["DeepseekVLHybridForConditionalGeneration" if cfg.is_hybrid
                          else "DeepseekVLForConditionalGeneration"],
        "model_type": "deepseek_vl_hybrid" if cfg.is_hybrid else "deepseek_vl",
        "image_token_id": cfg.image_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype,
        "text_config": _text_to_llama(cfg.text, cfg.tie_word_embeddings),
        "vision_config": dict(model_type="siglip_vision_model", hidden_size=s.hidden_size,
                              intermediate_size=s.intermediate_size, num_hidden_layers=s.num_hidden_layers,
                              num_attention_heads=s.num_attention_heads, num_channels=s.num_channels,
                              image_size=s.image_size, patch_size=s.patch_size, hidden_act=s.hidden_act,
                              layer_norm_eps=s.layer_norm_eps, attention_dropout=0.0, vision_use_head=s.use_head),
    }
    if cfg.is_hybrid:
        m = cfg.sam
        out["high_res_vision_config"] = dict(
            model_type="sam_vision_model", hidden_size=m.hidden_size, mlp_dim=m.mlp_dim,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_channels=m.num_channels, image_size=m.image_size, patch_size=m.patch_size,
            window_size=m.window_size, global_attn_indexes=list(m.global_attn_indexes),
            output_channels=m.output_channels, layer_norm_eps=m.layer_norm_eps, hidden_act=m.hidden_act,
            qkv_bias=m.qkv_bias, use_abs_pos=True, use_rel_pos=True, attention_dropout=0.0)
    return out


# ---------------------------------------------------------------------------------------------
# official deepseek-ai layout
# ---------------------------------------------------------------------------------------------
def _select_layers(depth: int, select_layer: int) -> int:
    """The official `create_siglip_vit` truncation of the block stack."""
    return min(depth, depth + select_layer + 1) if select_layer <= 0 else min(depth, select_layer)


def _siglip_from_official(p: dict, where: str) -> SiglipConfig:
    name = p.get("model_name", "siglip_large_patch16_384")
    if _ARCH_KEY in p:
        arch = dict(p[_ARCH_KEY])
    elif name in _SIGLIP_NAMED:
        arch = dict(_SIGLIP_NAMED[name])
        arch["num_hidden_layers"] = _select_layers(arch["num_hidden_layers"], p.get("select_layer", -2))
    else:
        raise ConfigError(f"{where}: unknown SigLIP model_name {name!r} (known: {sorted(_SIGLIP_NAMED)})")
    arch.setdefault("image_size", p.get("image_size", 384))
    return SiglipConfig(**{**arch, "pixel_mean": tuple(p.get("pixel_mean") or SIGLIP_MEAN),
                           "pixel_std": tuple(p.get("pixel_std") or SIGLIP_STD)})


def _sam_from_official(p: dict, where: str) -> SamConfig:
    name = p.get("model_name", "sam_b_downsample")
    if _ARCH_KEY in p:
        arch = dict(p[_ARCH_KEY])
        arch["global_attn_indexes"] = tuple(arch["global_attn_indexes"])
    elif name in _SAM_NAMED:
        arch = dict(_SAM_NAMED[name])
    else:
        raise ConfigError(f"{where}: unknown SAM model_name {name!r} (known: {sorted(_SAM_NAMED)})")
    arch.setdefault("image_size", p.get("image_size", 1024))
    return SamConfig(**{**arch, "pixel_mean": tuple(p.get("pixel_mean") or CLIP_MEAN),
                        "pixel_std": tuple(p.get("pixel_std") or CLIP_STD)})


def from_official(d: dict, where: str = "config.json") -> VLMConfig:
    if d.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is not {OFFICIAL_MODEL_TYPE!r}")
    try:
        vis, ali, lang = d["vision_config"], d["aligner_config"], d["language_config"]
        vparams, aparams = vis.get("params", {}), ali.get("params", {})
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"{where}: missing or malformed vision/aligner/language config ({e})") from None
    cls = vis.get("cls", "")
    if "HybridVisionTower" in cls:
        siglip = _siglip_from_official(vparams["low_res_cfg"], f"{where}: low_res_cfg")
        sam = _sam_from_official(vparams["high_res_cfg"], f"{where}: high_res_cfg")
    elif "CLIPVisionTower" in cls:
        siglip, sam = _siglip_from_official(vparams, f"{where}: vision_config"), None
    else:
        raise ConfigError(f"{where}: vision_config.cls {cls!r} is not CLIPVisionTower or HybridVisionTower")
    text = _text_from_llama(lang, f"{where}: language_config")
    tie = bool(lang.get("tie_word_embeddings", False))
    return VLMConfig(text=text, siglip=siglip, sam=sam, adapter=aparams.get("projector_type", "mlp_gelu"),
                     adapter_depth=aparams.get("depth", 2), image_token_id=d.get(_ARCH_KEY, {}).get(
                         "image_token_id", 100015), tie_word_embeddings=tie)


def _tower_params(arch, named: dict, name_guess: str, select_layer_ok=True) -> dict:
    fields = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)
              if f.name not in ("pixel_mean", "pixel_std")}
    std = named.get(name_guess)
    matches = std is not None and all(fields.get(k) == (tuple(v) if isinstance(v, list) else v) for k, v in std.items())
    p = {"model_name": name_guess, "select_feature": "same", "image_size": arch.image_size,
         "pixel_mean": list(arch.pixel_mean), "pixel_std": list(arch.pixel_std), "select_layer": -1, "ckpt_path": ""}
    if not matches:  # not a size the official code knows: carry the architecture explicitly
        p[_ARCH_KEY] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
    return p


def to_official(cfg: VLMConfig, dtype: str = "bfloat16") -> dict:
    if cfg.token_merge != 1:
        raise ConfigError("the official layout has no visual-token merge: export a model with token_merge=1")
    low = _tower_params(cfg.siglip, _SIGLIP_NAMED, "siglip_large_patch16_384")
    if cfg.is_hybrid:
        high = _tower_params(cfg.sam, _SAM_NAMED, "sam_b_downsample")
        high["output_dim"] = 4 * cfg.sam.output_channels
        low["output_dim"] = cfg.siglip.hidden_size
        vision = {"cls": "HybridVisionTower",
                  "params": {"concat_type": "tuple", "freeze_high": False, "freeze_low": False, "ignore_head": True,
                             "image_size": cfg.sam.image_size, "high_res_cfg": high, "low_res_cfg": low}}
        input_dim = cfg.siglip.hidden_size
    else:
        vision = {"cls": "CLIPVisionTower", "params": low}
        input_dim = cfg.siglip.hidden_size
    lang = _text_to_llama(cfg.text, cfg.tie_word_embeddings)
    lang.pop("rope_parameters")
    out = {
        "model_type": OFFICIAL_MODEL_TYPE,
        "vision_config": vision,
        "aligner_config": {"cls": "MlpProjector", "params": {
            "projector_type": cfg.adapter, "depth": cfg.adapter_depth, "input_dim": input_dim,
            "n_embed": cfg.text.hidden_size}},
        "language_config": lang,
        "torch_dtype": dtype,
        "architectures": ["MultiModalityCausalLM"],
    }
    if cfg.image_token_id != 100015:  # the official code hard-codes the tokenizer; keep ours for round trips
        out[_ARCH_KEY] = {"image_token_id": cfg.image_token_id}
    return out


def detect_layout(d: dict, where: str) -> str:
    mt = d.get("model_type")
    if mt in HF_MODEL_TYPES:
        return "hf"
    if mt == OFFICIAL_MODEL_TYPE:
        return "official"
    raise ConfigError(f"{where}: unknown model_type {mt!r}; expected one of {HF_MODEL_TYPES + (OFFICIAL_MODEL_TYPE,)}")


def from_any(d: dict, where: str) -> tuple[str, VLMConfig]:
    layout = detect_layout(d, where)
    return layout, (from_hf(d, where) if layout == "hf" else from_official(d, where))
