"""A tiny random-weight checkpoint folder (HF-port layout + a BPE tokenizer) for the inference commands'
tests, built in well under a second and without PyTorch: params drawn with numpy from the config's
shapes, at std 0.2 (as tests/test_generation.py), so that greedy decoding wanders over many tokens
instead of repeating one."""
from __future__ import annotations

import numpy as np
from flax import traverse_util
from PIL import Image

from dsvl_jax import config as C
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer, sample_corpus
from dsvl_jax.state import param_shapes

WEIGHT_STD = 0.2


def random_params(cfg, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in sorted(param_shapes(cfg).items()):
        x = rng.normal(0.0, WEIGHT_STD, shape.shape)
        if path.endswith("/scale"):  # norms near one, as trained ones are
            x = 1.0 + 0.5 * x
        flat[path] = x.astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def write_checkpoint(path: str, cfg=None, seed: int = 3):
    """Write the checkpoint under `path`; returns (config, tokenizer)."""
    cfg = C.tiny(hybrid=False) if cfg is None else cfg
    save_pretrained((cfg, random_params(cfg, seed)), path, overwrite=True)
    tokenizer = build_bpe_tokenizer(sample_corpus(300), cfg.text.vocab_size, path)
    assert tokenizer.image_token_id == cfg.image_token_id
    return cfg, tokenizer


def picture(seed: int, size=(40, 56)) -> Image.Image:
    """A small RGB image, different for each seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8))
