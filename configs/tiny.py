r"""A ~1M-parameter hybrid DeepSeek-VL for tests and the CPU demo; all code paths of the 7B.

    python -m dsvl_jax.data.synthetic runs/data     # a synthetic corpus and a tokenizer whose ids fit this model
    dsvl-train --config configs/tiny.py:stage2 --workdir runs/tiny --config.total_steps=20 \
        --config.data.tokenizer=runs/data/tokenizer.json --config.data.sources_json="$(cat runs/data/sources.json)"

(The README's first run; `tests/test_readme_commands.py` runs it as written.)

Hardware and cost: a 2-core CPU, ~0.1 s a step at batch 8 × 160 tokens.
Variants: stage1 | stage2 | stage3 (the paper's trainable sets and schedules, scaled down).
"""
from dsvl_jax.train.config_base import base, paper_stage
from dsvl_jax.config import tiny


def get_config(arg: str = "stage1"):
    c = base(tiny())
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    c.log_every = 5
    c.loss_chunk = 64
    if arg == "stage1":
        paper_stage(c, stage=1, lr=1e-3, schedule="cosine", warmup=10, steps=100, batch=8, seq_len=96, pack=False)
    elif arg == "stage2":
        paper_stage(c, stage=2, lr=3e-4, schedule="step", warmup=10, steps=100, batch=8, seq_len=160, pack=True)
        c.data.mm_warmup_steps = 20
        c.data.max_images_per_row = 2
    elif arg == "stage3":
        paper_stage(c, stage=3, lr=2e-4, schedule="cosine", warmup=10, steps=100, batch=8, seq_len=96, pack=False)
    else:
        raise ValueError(f"unknown variant {arg!r}: stage1, stage2 or stage3")
    return c
