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
