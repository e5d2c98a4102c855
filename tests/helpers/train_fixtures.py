"""A tiny corpus + tokenizer on disk and tiny training configs pointing at them (for the trainer tests)."""
from __future__ import annotations

import os

from dsvl_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subprocess_env() -> dict:
    """The environment of a trainer run in a child process: 8 forced CPU devices and full-precision matmuls, as
    in this process (tests/conftest.py), the repository importable, and the same persistent compile cache, so
    the child loads the programs the other trainer tests compiled instead of compiling them again."""
    import jax

    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_corpus(root: str, seed: int = 0):
    """(sources as config dicts, tokenizer.json path) under root."""
    sources = synthetic.write_corpus(os.path.join(root, "corpus"), seed=seed, n_text=24, n_caption=16,
                                     n_interleaved=8, n_sft=8)
    tok_dir = os.path.join(root, "tok")
    synthetic.corpus_tokenizer(tok_dir)
    srcs = [dict(name=s.name, paths=s.paths, weight=s.weight, modality=s.modality) for s in sources]
    return srcs, os.path.join(tok_dir, "tokenizer.json")


def long_prompt_records(n: int = 4, words: int = 240):
    """Conversations whose system prompt alone is longer than the tiny configs' rows (`words` words, a token or
    more each; seq_len 160): the packer skips every one, "nothing supervised within seq_len"."""
    import numpy as np

    from dsvl_jax.data import records as R
    rng = np.random.default_rng(1)
    return [R.Record(f"long-{i}", "long", "sft", (R.text(synthetic.sentence(rng, words), "system"),
                                                  R.text(synthetic.sentence(rng, 4) + "?", "user"),
                                                  R.text(synthetic.sentence(rng, 3), "assistant")))
            for i in range(n)]


def write_long_prompt_source(root: str) -> dict:
    """`long_prompt_records` as a text-modality source (a config dict) under root."""
    from dsvl_jax.data import records as R
    R.write_records(os.path.join(root, "long"), long_prompt_records())
    return dict(name="long", paths=os.path.join(root, "long-*.array_record"), weight=1.0, modality="text")


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


def checkpoint_state(workdir: str, step: int) -> dict:
    """The whole `state` item of a trainer checkpoint (params, optimizer state, counters) as flat numpy
    arrays keyed by path; opt_state holds tuples, so everything is flattened."""
    return orbax_tree(os.path.join(workdir, "checkpoints", str(step), "state"))


def orbax_tree(path: str) -> dict:
    """Every array of the Orbax PyTree folder `path` (a step's state, a LoRA run's lora_base) as flat numpy
    arrays keyed by path."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    ckpt = ocp.PyTreeCheckpointer()
    meta = ckpt.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    leaves = jax.tree_util.tree_flatten_with_path(out)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): np.asarray(v) for kp, v in leaves}
