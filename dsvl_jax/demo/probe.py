"""The vision probe: the smallest end-to-end proof that training reaches the towers and that answers come from
the pixels.

One purely visual question ("What color is the shape?": one shape, one of six colours, on a plain noisy
background) goes through everything the demo uses: records → ArrayRecord → Grain → the real trainer (every
group trained, from random weights) → Orbax → greedy KV-cache generation. Run twice:
- `shuffle=False`: the model must reach high held-out exact match;
- `shuffle=True`: each training question is paired with another example's image, so the answer no longer
  depends on the picture; held-out accuracy must stay near chance (1 / 6).
A gap between the two is what "the model reads the image" means, measured.

    python -m dsvl_jax.demo.probe            # both runs, under a minute each on 2 idle cores
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil

import numpy as np

from dsvl_jax import tasks
from dsvl_jax.data import records as R
from dsvl_jax.demo import data, evaluate, recipe
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer import Tokenizer
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer
from dsvl_jax.convert.orbax_io import load_orbax_params
from dsvl_jax.runtime import VLM
from dsvl_jax.tasks import scene
from dsvl_jax.tasks.render import COLORS, Canvas, jitter
from dsvl_jax.train.trainer import train

PROBE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
QUESTION = "What color is the shape?"


def colour_example(seed: int, index: int, image_size: int, balanced: bool = False) -> tasks.Example:
    """One shape of a random colour, size and place on a light grey background with pixel noise.
    `balanced`: the colour cycles with `index`, so that any answer that ignores the image scores exactly 1/6
    on a multiple of six examples (the held-out set)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1000, index]))
    colour, shape = PROBE_COLORS[rng.integers(len(PROBE_COLORS))], scene.SHAPES[rng.integers(len(scene.SHAPES))]
    if balanced:
        colour = PROBE_COLORS[index % len(PROBE_COLORS)]
    grey = int(rng.integers(200, 245))
    canvas = Canvas(image_size, (grey, grey, grey))
    r = image_size * rng.uniform(0.12, 0.25)
    cx, cy = rng.uniform(r, image_size - r, size=2)
    fill = jitter(COLORS[colour], rng, 12)
    scene.draw_shape(canvas, shape, cx, cy, r, fill)
    image = canvas.finish(rng, 4.0)
    return tasks.Example(image, QUESTION, colour, "scene", f"probe-s{seed}-i{index}", kind="color")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    n_train: int = 600
    n_eval: int = 120
    steps: int = 300
    batch: int = 8
    lr: float = 2e-3
    image_size: int = 64
    seed: int = 0
    size: recipe.ModelSize = recipe.ModelSize(image_size=64, sam_width=32, sam_layers=2, siglip_width=32,
                                              siglip_layers=1, lm_width=64, lm_layers=2, lm_heads=2, context=128)


def write_probe_data(root: str, s: ProbeSettings, shuffle: bool) -> tuple[str, str]:
    """(records glob, tokenizer.json). With `shuffle`, question i is answered by example i's colour but shown
    example perm[i]'s image."""
    train = [colour_example(2 * s.seed, i, s.image_size) for i in range(s.n_train)]
    pngs = [e.png_bytes() for e in train]
    if shuffle:
        perm = np.random.default_rng(s.seed).permutation(len(train))
        pngs = [pngs[j] for j in perm]
    recs = [data.qa_record(e, png) for e, png in zip(train, pngs)]
    R.write_records(os.path.join(root, "probe"), recs, num_shards=1)
    texts = [f"{data.SYSTEM_PROMPT}\n\nUser: {QUESTION}\n\nAssistant: {c}" for c in PROBE_COLORS] * 16
    build_bpe_tokenizer(texts, 300, os.path.join(root, "tokenizer"))
    return os.path.join(root, "probe") + "-*.array_record", os.path.join(root, "tokenizer", "tokenizer.json")


def run_probe(workdir: str, s: ProbeSettings = ProbeSettings(), *, shuffle: bool = False) -> dict:
    """Train from random weights on the probe (all groups), then score held-out requests. → summary dict."""
    if os.path.isdir(workdir):
        shutil.rmtree(workdir)
    glob, tok_path = write_probe_data(os.path.join(workdir, "data"), s, shuffle)
    tok = Tokenizer.from_file(tok_path)
    model = recipe.demo_model(tok.vocab_size, tok.image_token_id, 1, s.size)
    cfg = recipe.stage_config(3, model, tokenizer=tok_path, sources=[dict(name="qa", paths=glob, weight=1.0)],
                              tasks=("scene",), steps=s.steps, batch=s.batch, seq_len=_seq_len(model), lr=s.lr,
                              seed=s.seed, train_sam=True, pack=True, images_per_row=2)
    out = train(cfg, os.path.join(workdir, "train"))
    heldout = [colour_example(2 * s.seed + 1, i, s.image_size, balanced=True) for i in range(s.n_eval)]
    vlm = VLM(*load_orbax_params(os.path.join(workdir, "train")))
    scores = evaluate.score(vlm, Processor(tok, model, system_prompt=data.SYSTEM_PROMPT), heldout,
                            max_new_tokens=8, batch_size=min(60, s.n_eval))
    return {"shuffle": shuffle, "accuracy": scores.mean, "chance": 1 / len(PROBE_COLORS),
            "final_loss": float(out.get("loss", float("nan"))), "steps": int(out["step"])}


def _seq_len(model) -> int:
    return -(-2 * (model.num_image_tokens + 24) // 8) * 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsvl_jax.demo.probe", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdir/probe")
    p.add_argument("--steps", type=int, default=ProbeSettings.steps)
    a = p.parse_args(argv)
    s = ProbeSettings(steps=a.steps)
    for shuffle in (False, True):
        r = run_probe(os.path.join(a.workdir, "shuffled" if shuffle else "paired"), s, shuffle=shuffle)
        print(f"images {'shuffled' if shuffle else 'paired'}: held-out exact match {100 * r['accuracy']:.1f}% "
              f"(chance {100 * r['chance']:.1f}%), final loss {r['final_loss']:.3f} after {r['steps']} steps",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
