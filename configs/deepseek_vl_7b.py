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
from dsvl_jax.config import deepseek_vl_7b
from dsvl_jax.train.config_base import released_size_config


def get_config(arg: str = "stage2"):
    return released_size_config(deepseek_vl_7b(), "7b", arg)
