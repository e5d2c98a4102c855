r"""DeepSeek-VL 7B (SAM-B + SigLIP hybrid), the paper's three stages (Table 4), on a Cloud TPU slice.

    dsvl-train --config configs/deepseek_vl_7b.py:stage2 --workdir gs://BUCKET/7b/s2 \
        --config.init.from_checkpoint=gs://BUCKET/7b/s1 --config.data.tokenizer=... --config.data.sources_json='[...]'

Hardware and cost (model FLOPs from `dsvl_jax.train.flops`, MFU assumed 45%; v5p-N has N/2 chips; memory from
`python tools/aot_compile.py --config configs/deepseek_vl_7b.py:stage2 --topology v5p:4x4x8 --grad-accum 18`):
  stage 1: 15k steps × 256 rows × 1,024 tokens, adaptor (+ SAM necks/downsample) → 1.1e20 FLOP → ~5 h on v5p-64.
  stage 2: 42k steps × 2,304 rows × 4,096 tokens (packed, 7:3 text:multimodal, modality warm-up)
           → 1.8e22 FLOP → ~8 days on v5p-256 (128 chips; 23 GiB per chip at grad_accum 18, AOT-compiled);
           the smallest v5p slice that fits at the paper's batch is v5p-16 (86.6 GiB per chip, grad_accum 144).
  stage 3: 10k steps × 256 rows × 4,096 tokens, SAM-B frozen → 5e20 FLOP → ~21 h on v5p-64.
LoRA SFT (`:lora`; `dsvl_jax.train.config_base.lora_sft`): stage 3's data, schedule and batch, r=16 adapters on every
LLM projection, the adaptor MLP (aligner/) in full, everything else frozen (no optimizer state), lr 2e-4:
    dsvl-train --config configs/deepseek_vl_7b.py:lora --workdir gs://BUCKET/7b/lora \
        --config.init.from_pretrained=gs://BUCKET/deepseek-vl-7b-chat \
        --config.data.tokenizer=... --config.data.sources_json='[...]'
    dsvl-convert LOCAL_COPY_OF_WORKDIR 7b-peft --to peft     # adapter_config.json + adapter_model.safetensors
    dsvl-convert LOCAL_COPY_OF_WORKDIR 7b-merged --to hf --merge
  AOT per-chip memory on v5p-8 (4 chips, fsdp=4, grad_accum 64: 1 row x 4,096 tokens a chip, 4 image slots a row),
  `python tools/aot_compile.py --config configs/deepseek_vl_7b.py:lora --topology v5p:2x2x1 --grad-accum 64`:
  LoRA 10.6 args + 33.6 temp = 44.3 GiB vs full stage 3 (`:stage3`, same flags) 23.8 + 52.1 = 76.0 GiB (of 95),
  compiled in 23 and 6 min on the 2-core host. At grad_accum 16 (4 rows a chip) even LoRA does not fit: 109 GB
  of temporaries (the compile says so in 17 s).
"""
from dsvl_jax.config import deepseek_vl_7b
from dsvl_jax.train.config_base import lora_sft, released_size_config


def get_config(arg: str = "stage2"):
    if arg == "lora":  # LoRA SFT: stage 3's data and schedule, r=16 adapters on the LLM, aligner/ in full
        return lora_sft(released_size_config(deepseek_vl_7b(), "7b", "stage3"))
    return released_size_config(deepseek_vl_7b(), "7b", arg)
