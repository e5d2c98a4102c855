"""A tiny corpus + tokenizer on disk and tiny training configs pointing at them (for the trainer tests)."""
from __future__ import annotations

import os

from dsvl_jax.data import synthetic


def make_corpus(root: str, seed: int = 0):
    """(sources as config dicts, tokenizer.json path) under root."""
    sources = synthetic.write_corpus(os.path.join(root, "corpus"), seed=seed, n_text=24, n_caption=16,
                                     n_interleaved=8, n_sft=8)
    tok_dir = os.path.join(root, "tok")
    synthetic.corpus_tokenizer(tok_dir)
    srcs = [dict(name=s.name, paths=s.paths, weight=s.weight, modality=s.modality) for s in sources]
    return srcs, os.path.join(tok_dir, "tokenizer.json")


def tiny_config(variant: str, sources, tokenizer, **overrides):
    import importlib.util
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(here, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant)
    c.data.sources = sources
    c.data.tokenizer = tokenizer
    for k, v in overrides.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return c
