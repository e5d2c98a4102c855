r"""DeepSeek-VL 1.3B, the paper's three stages (Table 4), on a Cloud TPU slice.

    dsvl-train --config configs/deepseek_vl_1p3b.py:stage1 --workdir gs://BUCKET/1p3b/s1 \
        --config.data.tokenizer=... --config.data.sources='[...]'
    dsvl-train --config configs/deepseek_vl_1p3b.py:stage2 --workdir .../s2 --config.init.from_checkpoint=.../s1
    dsvl-train --config configs/deepseek_vl_1p3b.py:stage3 --workdir .../s3 --config.init.from_checkpoint=.../s2

Hardware and cost (analytic FLOPs, `tools/aot_compile.py` for memory; MFU assumed 45%):
  stage 1: 15k steps × 256 rows × 1,024 tokens, adaptor only (frozen LLM: backward through it) → ~4 h on v5p-8.
  stage 2: 96k steps × 1,024 rows × 4,096 tokens (packed, 7:3 text:multimodal) → ~4.4e21 FLOP → ~6 days on v5p-64.
  stage 3: 10k steps × 256 rows × 4,096 tokens → ~12 h on v5p-64.
Stage 1 uses 1,024 tokens instead of the paper's 512: one image alone is 576 tokens.
"""
from dsvl_jax.train.config_base import base, paper_stage
from dsvl_jax.config import deepseek_vl_1p3b


def get_config(arg: str = "stage1"):
    model = deepseek_vl_1p3b().replace(dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
    c = base(model)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    if arg == "stage1":
        paper_stage(c, stage=1, lr=1e-3, schedule="cosine", warmup=128, steps=15000, batch=256, seq_len=1024,
                    pack=False)
    elif arg == "stage2":
        paper_stage(c, stage=2, lr=3e-5, schedule="step", warmup=2000, steps=96000, batch=1024, seq_len=4096,
                    pack=True)
        c.data.mm_warmup_steps = 2000
        c.data.max_images_per_row = 4
    elif arg == "stage3":
        paper_stage(c, stage=3, lr=2e-5, schedule="cosine", warmup=256, steps=10000, batch=256, seq_len=4096,
                    pack=False)
        c.data.max_images_per_row = 4
    else:
        raise ValueError(f"unknown variant {arg!r}: stage1, stage2 or stage3")
    c.checkpoint.every = 1000
    return c
