"""Reference PyTorch models for parity tests: transformers' DeepSeek-VL port built from our config,
with every weight randomised (HF initialises rel-pos tables, positions and the hd alpha to zero,
which would hide bugs), written with `save_pretrained`."""
from __future__ import annotations

import numpy as np
import torch

from dsvl_jax.config import VLMConfig
from dsvl_jax.convert import config_io


def hf_config(cfg: VLMConfig):
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig
    d = config_io.to_hf(cfg)
    d = {k: v for k, v in d.items() if k not in ("architectures", "dtype", "model_type")}
    klass = DeepseekVLHybridConfig if cfg.is_hybrid else DeepseekVLConfig
    return klass(**d)


def hf_model(cfg: VLMConfig, seed: int = 0, std: float = 0.05):
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration
    torch.manual_seed(seed)
    klass = DeepseekVLHybridForConditionalGeneration if cfg.is_hybrid else DeepseekVLForConditionalGeneration
    model = klass(hf_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            elif name.endswith("high_res_vision_alpha"):
                p.copy_(torch.tensor([0.7]))
            else:
                p.copy_(noise)
    return model


def save_hf(model, path):
    model.save_pretrained(path)
    return path


def image_batch(cfg: VLMConfig, n: int, seed: int = 0):
    """HF-contract pixels: (pixel_values [n,3,s,s], high_res_pixel_values [n,3,S,S] | None) as numpy."""
    rng = np.random.default_rng(seed)
    s = cfg.siglip.image_size
    pv = rng.standard_normal((n, 3, s, s)).astype(np.float32)
    hv = None
    if cfg.sam is not None:
        S = cfg.sam.image_size
        hv = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    return pv, hv


def prompt_ids(cfg: VLMConfig, images_per_row, length: int, seed: int = 0, left_pad=()):
    """[B, T] ids with each row's image-token runs (num_image_tokens each) at random text offsets."""
    rng = np.random.default_rng(seed)
    rows = []
    for b, n_img in enumerate(images_per_row):
        text = length - n_img * cfg.num_image_tokens
        assert text >= n_img + 1, "prompt too short for its images"
        vocab = [i for i in range(1, cfg.text.vocab_size) if i != cfg.image_token_id]
        toks = list(rng.choice(vocab, size=text))
        cuts = sorted(rng.choice(np.arange(1, text), size=n_img, replace=False))
        row = []
        prev = 0
        for c in cuts:
            row += toks[prev:c] + [cfg.image_token_id] * cfg.num_image_tokens
            prev = c
        row += toks[prev:]
        rows.append(row)
    return np.array(rows, dtype=np.int64)


def torch_logits(model, input_ids, pixel_values=None, high_res_pixel_values=None, attention_mask=None):
    kw = {}
    if pixel_values is not None:
        kw["pixel_values"] = torch.from_numpy(pixel_values)
    if high_res_pixel_values is not None:
        kw["high_res_pixel_values"] = torch.from_numpy(high_res_pixel_values)
    if attention_mask is not None:
        kw["attention_mask"] = torch.from_numpy(np.asarray(attention_mask))
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(input_ids)), **kw).logits.float().numpy()


# ---- a float64 reference ---------------------------------------------------------------------------
def float64_copy(model):
    """A float64 copy of `model` (the same weights, exactly: float32 -> float64 is lossless)."""
    import copy
    return copy.deepcopy(model).double().eval()


class float64_reference:
    """Context in which transformers' DeepSeek-VL modules compute in float64 end to end.

    `model.double()` alone is not enough: transformers upcasts to float32 in places (softmax(dtype=float32)
    in the attention functions, LlamaRMSNorm's `.to(torch.float32)`, the rotary angles' `.float()`), which
    would leave float32 rounding in the reference. Inside this context those steps keep float64 inputs in
    float64 (float32 inputs are untouched). A forward hook on every module checks that no float32 tensor
    leaves any module of the float64 model, so an upcast added by a future transformers shows up here.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import torch.nn.functional as F
        from transformers.models.llama import modeling_llama as ML

        self._saved = [(F, "softmax", F.softmax), (ML.LlamaRMSNorm, "forward", ML.LlamaRMSNorm.forward),
                       (ML.LlamaRotaryEmbedding, "forward", ML.LlamaRotaryEmbedding.forward)]
        softmax, rms, rope = (s[2] for s in self._saved)

        def softmax64(x, *args, dtype=None, **kw):
            return softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kw)

        def rms64(norm, h):
            if h.dtype != torch.float64:
                return rms(norm, h)
            variance = h.pow(2).mean(-1, keepdim=True)
            return norm.weight * (h * torch.rsqrt(variance + norm.variance_epsilon))

        def rope64(emb, x, position_ids):
            if x.dtype != torch.float64:
                return rope(emb, x, position_ids)
            # inv_freq is the float32 buffer transformers computed (our implementation computes the same
            # float32 values); the angles, cos and sin are float64.
            freqs = position_ids[..., None].double() * emb.inv_freq.to(torch.float64)
            angles = torch.cat((freqs, freqs), dim=-1)
            return angles.cos() * emb.attention_scaling, angles.sin() * emb.attention_scaling

        F.softmax, ML.LlamaRMSNorm.forward, ML.LlamaRotaryEmbedding.forward = softmax64, rms64, rope64
        self._hooks = [m.register_forward_hook(self._check) for m in self.model.modules()]
        return self

    @staticmethod
    def _check(module, args, out):
        if isinstance(out, torch.Tensor):
            outs = [out]
        elif isinstance(out, dict):  # ModelOutput
            outs = list(out.values())
        else:
            outs = list(out) if isinstance(out, (tuple, list)) else []
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                assert t.dtype == torch.float64, f"{type(module).__name__} returned {t.dtype} in the float64 reference"

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)
        return False
