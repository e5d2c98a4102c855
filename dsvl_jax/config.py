"""Model configuration: one frozen dataclass per part, and the released presets.

Field names follow the HF transformers port (so that `config.json` maps field for field); the
presets reproduce the released checkpoints (reference doc §1). Training settings live in
`configs/` (ml_collections); this file only describes the network.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ADAPTER_TYPES = ("mlp_gelu", "low_high_hybrid_split_mlp_gelu", "linear", "identity")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "silu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "everything")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP ViT (timm `VisionTransformer` in the official code, `SiglipVisionModel` in HF)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24  # blocks actually built, i.e. after `select_layer` truncation
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"  # exact erf GELU, as the official timm code
    use_head: bool = True  # MAP head parameters kept for lossless conversion, never run
    pixel_mean: Tuple[float, float, float] = SIGLIP_MEAN
    pixel_std: Tuple[float, float, float] = SIGLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """SAM-B image encoder (ViTDet) with DeepSeek's neck, as in `sam.py` / HF `SamVisionModel`."""

    hidden_size: int = 768
    mlp_dim: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    output_channels: int = 256
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    pixel_mean: Tuple[float, float, float] = CLIP_MEAN
    pixel_std: Tuple[float, float, float] = CLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """DeepSeek-LLM decoder (LLaMA architecture)."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """The whole model. `sam is None` → the 1.3B layout (one SigLIP tower)."""

    text: TextConfig = TextConfig()
    siglip: SiglipConfig = SiglipConfig()
    sam: Optional[SamConfig] = None
    adapter: str = "mlp_gelu"
    adapter_depth: int = 2
    image_token_id: int = 100015
    tie_word_embeddings: bool = False
    # Official checkpoints of the 7B carry two LayerNorms that forward never uses; kept when present.
    unused_hybrid_norms: bool = False
    # 2x2 merge of visual tokens before the LM (576 -> 144); 1 = off (released models).
    token_merge: int = 1
    # Compute / parameter dtypes and memory policy (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"  # none | full | dots | dots_no_batch | everything: every tower's default
    # Per tower ("" = remat_policy): SAM at 1,024 px holds the most activations, the LLM the most FLOPs.
    remat_policy_sam: str = ""
    remat_policy_siglip: str = ""
    remat_policy_llm: str = ""
    sam_attention_impl: str = "auto"  # relpos attention for SAM global blocks: auto|pallas|blockwise|reference
    # "int8": the LLM's linears and lm_head hold int8 weights + per-channel scales (`models.quant`); part
    # of a quantized Orbax checkpoint's config, since the params differ.
    quantization: str = "none"  # none | int8

    def __post_init__(self):
        for key in ("remat_policy", "remat_policy_sam", "remat_policy_siglip", "remat_policy_llm"):
            value = getattr(self, key)
            if value not in REMAT_POLICIES and not (value == "" and key != "remat_policy"):
                raise ValueError(f"{key}={value!r}: expected one of {REMAT_POLICIES}"
                                 f"{'' if key == 'remat_policy' else ' or empty (= remat_policy)'}")
        if self.adapter not in ADAPTER_TYPES:
            raise ValueError(f"adapter={self.adapter!r}: expected one of {ADAPTER_TYPES}")
        if self.adapter == "low_high_hybrid_split_mlp_gelu" and self.sam is None:
            raise ValueError("adapter 'low_high_hybrid_split_mlp_gelu' needs a SAM tower (sam=None)")
        if self.sam is not None and self.adapter != "low_high_hybrid_split_mlp_gelu":
            raise ValueError(f"a hybrid tower needs adapter 'low_high_hybrid_split_mlp_gelu', got {self.adapter!r}")
        if self.text.num_attention_heads % self.text.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.text.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.text.num_key_value_heads}")
        for name, part in (("siglip", self.siglip), ("sam", self.sam)):
            if part is not None and part.hidden_act not in ACTIVATIONS:
                raise ValueError(f"{name}.hidden_act={part.hidden_act!r}: expected one of {ACTIVATIONS}")
        if self.sam is not None:
            bad = [i for i in self.sam.global_attn_indexes if not 0 <= i < self.sam.num_hidden_layers]
            if bad or not self.sam.global_attn_indexes:
                raise ValueError(f"sam.global_attn_indexes={self.sam.global_attn_indexes} must be non-empty "
                                 f"indices below num_hidden_layers={self.sam.num_hidden_layers}")
        if self.quantization not in ("none", "int8"):
            raise ValueError(f"quantization={self.quantization!r}: expected 'none' or 'int8'")
        if self.token_merge not in (1, 2):
            raise ValueError(f"token_merge={self.token_merge}: expected 1 (off) or 2 (2x2 merge)")
        if self.token_merge == 2 and self.siglip.grid % 2:
            raise ValueError(f"token_merge=2 needs an even SigLIP grid, got {self.siglip.grid}")

    def tower_remat(self, tower: str) -> str:
        """The remat policy of one tower ('sam', 'siglip' or 'llm'): its own, else `remat_policy`."""
        return getattr(self, f"remat_policy_{tower}") or self.remat_policy

    def without_remat(self) -> "VLMConfig":
        return dataclasses.replace(self, remat_policy="none", remat_policy_sam="", remat_policy_siglip="",
                                   remat_policy_llm="")

    @property
    def is_hybrid(self) -> bool:
        return self.sam is not None

    @property
    def image_size(self) -> int:
        """Size of the one square image the processor delivers (the high-res size for the hybrid)."""
        return self.sam.image_size if self.sam is not None else self.siglip.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.siglip.num_patches // (self.token_merge ** 2)

    @property
    def hd_output_size(self) -> int:
        """Side of the SAM feature map after the two stride-2 convs; equals the SigLIP grid."""
        return self.siglip.grid

    def replace(self, **kw) -> "VLMConfig":
        return dataclasses.replace(self, **kw)

    # ---- (de)serialisation as plain dicts (ml_collections and JSON friendly) ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "VLMConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        parts = {"text": TextConfig, "siglip": SiglipConfig, "sam": SamConfig}
        for key, klass in parts.items():
            if key in d and d[key] is not None and not isinstance(d[key], klass):
                d[key] = _dataclass_from_dict(klass, d[key], key)
        return cls(**d)


def _dataclass_from_dict(klass, d, where: str):
    d = dict(d)
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys in model config '{where}': {unknown}")
    for k, v in list(d.items()):
        if isinstance(v, list):
            d[k] = tuple(v)
    return klass(**d)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def deepseek_vl_1p3b() -> VLMConfig:
    """deepseek-vl-1.3b-{base,chat}: SigLIP-L/16@384 → mlp_gelu → 24-layer 2048-wide DeepSeek-LLM."""
    return VLMConfig(
        text=TextConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=16, head_dim=128),
        siglip=SiglipConfig(),
        sam=None,
        adapter="mlp_gelu",
    )


def deepseek_vl_7b() -> VLMConfig:
    """deepseek-vl-7b-{base,chat}: SAM-B@1024 + SigLIP-L@384 → hybrid split MLP → 30-layer 4096-wide LLM."""
    return VLMConfig(
        text=TextConfig(),
        siglip=SiglipConfig(),
        sam=SamConfig(),
        adapter="low_high_hybrid_split_mlp_gelu",
        unused_hybrid_norms=True,
    )


def tiny(hybrid: bool = True, **overrides) -> VLMConfig:
    """A model small enough for CPU tests and the demo (≈1M params); all code paths of the real ones.

    SAM grid 8 with window 3 is deliberately not a multiple of the window (zero padding path).
    """
    cfg = VLMConfig(
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
        siglip=SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
        sam=(SamConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                       patch_size=8, window_size=3, global_attn_indexes=(1, 3), output_channels=16)
             if hybrid else None),
        adapter="low_high_hybrid_split_mlp_gelu" if hybrid else "mlp_gelu",
        image_token_id=511,
    )
    return cfg.replace(**overrides) if overrides else cfg


PRESETS = {
    "deepseek_vl_1p3b": deepseek_vl_1p3b,
    "deepseek_vl_7b": deepseek_vl_7b,
    "tiny": tiny,
    "tiny_siglip": lambda: tiny(hybrid=False),
}


def preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
