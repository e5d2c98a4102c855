r"""DeepSeek-VL 7B (SAM-B + SigLIP hybrid), the paper's three stages (Table 4), on a Cloud TPU slice.

    dsvl-train --config configs/deepseek_vl_7b.py:stage2 --workdir gs://BUCKET/7b/s2 \
        --config.init.from_checkpoint=gs://BUCKET/7b/s1 --config.data.tokenizer=... --config.data.sources='[...]'

Hardware and cost (analytic FLOPs; memory from `python tools/aot_compile.py --config configs/deepseek_vl_7b.py:stage2`;
MFU assumed 45%):
  stage 1: 15k steps × 256 rows × 1,024 tokens, adaptor (+ SAM necks/downsample) only → ~1 day on v5p-64.
  stage 2: 42k steps × 2,304 rows × 4,096 tokens (packed, 7:3 text:multimodal, modality warm-up)
           → ~1.7e22 FLOP → ~4.6 days on v5p-256 (the paper: 5 days on 512 A100s).
  stage 3: 10k steps × 256 rows × 4,096 tokens, SAM-B frozen → ~1 day on v5p-64.
"""
from dsvl_jax.train.config_base import base, paper_stage
from dsvl_jax.config import deepseek_vl_7b


def get_config(arg: str = "stage2"):
    model = deepseek_vl_7b().replace(dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
    c = base(model)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    if arg == "stage1":
        paper_stage(c, stage=1, lr=1e-3, schedule="cosine", warmup=128, steps=15000, batch=256, seq_len=1024,
                    pack=False)
    elif arg == "stage2":
        paper_stage(c, stage=2, lr=4.2e-5, schedule="step", warmup=2000, steps=42000, batch=2304, seq_len=4096,
                    pack=True)
        c.data.mm_warmup_steps = 2000
        c.data.max_images_per_row = 4
    elif arg == "stage3":
        paper_stage(c, stage=3, lr=2e-5, schedule="cosine", warmup=256, steps=10000, batch=256, seq_len=4096,
                    pack=False)
        c.data.max_images_per_row = 4
    else:
        raise ValueError(f"unknown variant {arg!r}: stage1, stage2 or stage3")
    return c
