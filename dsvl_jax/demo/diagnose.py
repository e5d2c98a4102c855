"""Does a demo checkpoint read its images? Scores and the scale of its visual tokens, for any stage folder.

    python -m dsvl_jax.demo.diagnose workdir/demo/merge1/stage3 [--step 250]

Prints exact match on held-out requests, on the same requests with shuffled images, and on train requests it
has seen; then the mean norm of the adaptor's output tokens against the text embeddings', and the share of
their variance that differs between images. This is how the numbers in `recipe.py` were measured. A stage-3-only
run of a variant, e.g. `python -m dsvl_jax.demo --steps 0,0,250 --weight-decay 0.1 --lr-mult adaptor=0.1
--eval-every 0 --no-transformers --workdir W`, gives the folder `W/merge1/stage3` to pass here.
"""
from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import numpy as np

from dsvl_jax import tasks
from dsvl_jax.convert.orbax_io import OrbaxError, load_orbax_params
from dsvl_jax.demo import data, evaluate
from dsvl_jax.models.vlm import DeepseekVL
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.runtime import VLM


def visual_token_scale(cfg, params, examples) -> dict:
    """Mean norm of the visual tokens and of the text embeddings, and the across-image share of the visual
    tokens' spread (1: all variation is between images; 0: every image gives the same tokens)."""
    images = np.stack([np.asarray(e.image.convert("RGB"), np.float32).transpose(2, 0, 1) / 255 for e in examples])
    feats = np.asarray(DeepseekVL(cfg).apply({"params": params}, jnp.asarray(images),
                                             method=lambda m, im: m.encode_images(images=im)))
    emb = np.asarray(params["language_model"]["embed_tokens"])
    return {"visual_norm": float(np.linalg.norm(feats, axis=-1).mean()),
            "text_norm": float(np.linalg.norm(emb, axis=-1).mean()),
            "across_image_share": float((feats - feats.mean(0, keepdims=True)).std() / feats.std())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsvl_jax.demo.diagnose", description=__doc__.splitlines()[0])
    p.add_argument("stage_dir", help="a demo stage folder (holds checkpoints/ and tokenizer.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--n", type=int, default=300, help="requests per split")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        cfg, params = load_orbax_params(a.stage_dir, a.step)
    except (OrbaxError, FileNotFoundError) as e:
        raise SystemExit(f"python -m dsvl_jax.demo.diagnose: {e}") from None
    tok = Tokenizer.from_file(os.path.join(a.stage_dir, "tokenizer.json"))
    size = cfg.sam.image_size if cfg.sam is not None else cfg.siglip.image_size
    heldout = tasks.make_split("heldout", a.n, tasks.FAMILIES, size, a.seed)
    seen = tasks.make_split("train", a.n, tasks.FAMILIES, size, a.seed)
    vlm, proc = VLM(cfg, params), Processor(tok, cfg, system_prompt=data.SYSTEM_PROMPT)
    kw = dict(max_new_tokens=evaluate.answer_budget(tok, [e.answer for e in heldout + seen]), batch_size=50)
    print(evaluate.table({"held-out": evaluate.score(vlm, proc, heldout, **kw),
                          "images shuffled": evaluate.score(vlm, proc, evaluate.with_shuffled_images(heldout, a.seed),
                                                            **kw),
                          "train (seen)": evaluate.score(vlm, proc, seen, **kw)}))
    s = visual_token_scale(cfg, params, heldout[:60])
    print(f"visual-token norm {s['visual_norm']:.2f}, text-embedding norm {s['text_norm']:.2f}, "
          f"across-image share of the visual tokens' spread {s['across_image_share']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
