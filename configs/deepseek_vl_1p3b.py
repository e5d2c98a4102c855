r"""DeepSeek-VL 1.3B, the paper's three stages (Table 4), on a Cloud TPU slice.

    dsvl-train --config configs/deepseek_vl_1p3b.py:stage1 --workdir gs://BUCKET/1p3b/s1 \
        --config.data.tokenizer=... --config.data.sources_json='[...]'
    dsvl-train --config configs/deepseek_vl_1p3b.py:stage2 --workdir .../s2 --config.init.from_checkpoint=.../s1
    dsvl-train --config configs/deepseek_vl_1p3b.py:stage3 --workdir .../s3 --config.init.from_checkpoint=.../s2

Hardware and cost (model FLOPs from `dsvl_jax.train.flops`, MFU assumed 45%; v5p-N has N/2 chips; check memory with
`python tools/aot_compile.py --config configs/deepseek_vl_1p3b.py:stage2 --topology v5p:4x4x4` before paying for a slice):
  stage 1: 15k steps × 256 rows × 1,024 tokens, adaptor only (the frozen LLM still runs its backward for dX)
           → 2.7e19 FLOP → ~4.5 h on v5p-16.
  stage 2: 96k steps × 1,024 rows × 4,096 tokens (packed, 7:3 text:multimodal) → 4.6e21 FLOP → ~8 days on v5p-64,
           ~2 days on v5p-256.
  stage 3: 10k steps × 256 rows × 4,096 tokens → 1.3e20 FLOP → ~5.5 h on v5p-64.
Stage 1 uses 1,024 tokens instead of the paper's 512: one image alone is 576 tokens.
LoRA SFT (`:lora`; `dsvl_jax.train.config_base.lora_sft`): stage 3's data, schedule and batch, r=16 adapters on every
LLM projection, the adaptor MLP (aligner/) in full, everything else frozen (no optimizer state), lr 2e-4:
    dsvl-train --config configs/deepseek_vl_1p3b.py:lora --workdir gs://BUCKET/1p3b/lora \
        --config.init.from_pretrained=gs://BUCKET/deepseek-vl-1p3b-chat \
        --config.data.tokenizer=... --config.data.sources_json='[...]'
    dsvl-convert LOCAL_COPY_OF_WORKDIR 1p3b-peft --to peft     # adapter_config.json + adapter_model.safetensors
    dsvl-convert LOCAL_COPY_OF_WORKDIR 1p3b-merged --to hf --merge
  AOT per-chip memory on v5p-8 (4 chips, fsdp=4, grad_accum 16: 4 rows x 4,096 tokens a chip, 4 image slots a row),
  `python tools/aot_compile.py --config configs/deepseek_vl_1p3b.py:lora --topology v5p:2x2x1 --grad-accum 16`:
  LoRA 2.4 args + 50.3 temp = 52.7 GiB vs full stage 3 (`:stage3`, same flags) 5.93 + 49.7 = 55.7 GiB (of 95):
  the activations dominate at this micro-batch; LoRA saves the fp32 Adam state and gradients of 1.3B params.
"""
from dsvl_jax.config import deepseek_vl_1p3b
from dsvl_jax.train.config_base import lora_sft, released_size_config


def get_config(arg: str = "stage1"):
    if arg == "lora":  # LoRA SFT: stage 3's data and schedule, r=16 adapters on the LLM, aligner/ in full
        return lora_sft(released_size_config(deepseek_vl_1p3b(), "1p3b", "stage3"))
    return released_size_config(deepseek_vl_1p3b(), "1p3b", arg)
