"""The demo's model and its training stages (ml_collections configs for `dsvl_jax.train.trainer.train`).

The model is a hybrid DeepSeek-VL (SAM-B-style high-res tower + SigLIP-style low-res tower → hybrid split
MLP adaptor → DeepSeek-LLM decoder), every part shrunk so that it learns the task suite on a CPU in minutes.
The SigLIP view is half the SAM resolution, as in the 7B (1024 / 384); both towers end on the same token
grid (the SAM branch's resize + two stride-2 convs make its map equal the SigLIP grid).

Stages (paper §3.2, scaled down; the demo starts from random weights where the paper starts from pretrained
towers and LLM):
0. (optional, `--stage0 N`) every group from random weights, to earn what the paper starts from;
1. adaptor warm-up on image–caption pairs;
2. joint pretraining, LLM + adaptor, text-only paragraphs mixed in with captions and task requests;
3. SFT on the task requests, LLM + adaptor + SigLIP — and, because nothing here is pretrained, SAM too
   (`train_sam`): a frozen random SAM caps what the model can read (the paper keeps its pretrained SAM frozen).

What the diagnosis measured (issue 13; 300 held-out requests, so ±2-3 points of noise):
- No defect in the path from pixels to answers: the vision probe (`demo/probe.py`, one purely visual question
  through the same records, loader, trainer and generation) reaches 100 % held-out in 200 steps and 13 % (chance
  17 %) with images shuffled across rows; packed rows give each example its solo logits (8.9e-8).
- Not the fixed image pool: at stage-3 step 250 requests trained on score what held-out ones score
  (11.3 % against 12.0 %): the model does not fit the pictures it has seen either.
- The frozen random LLM of stage 1 inflates the adaptor's output: visual-token norm 0.47 at init, 9.1 after
  stage 1 (60 steps), 25.5 after stage 2, 133 at stage-3 step 250 (text embeddings: 0.23–0.29); the share of the
  visual tokens' variance that differs between images falls from 0.64 to 0.37. Stage 3 alone does it too (54).
  The adaptor feeds only RMS-normed LM inputs, so no loss bounds that norm. LR × 0.1 on the adaptor with weight
  decay 0.1 on matrices keeps it at 1.2 (share 0.58): the demo's default. It does not change accuracy at step
  250 (15.7 % against 16.0 %).
- Learning rate: 5e-4 everywhere scores 11.0 % at step 250 against 16.0 % at 2e-3.
- What limits the demo: every request needs the model to find something named in the question (a row, a
  button, the circle among five shapes) and read it, learned from random weights. At stage-3 step 250 no
  variant reads the image (images shuffled score the same), even for the binary "trend up or down" (50 %).
  The single-shape probe, which needs no search, learns in 200 steps.
- Not the transcriptions: they hold ~95 % of stage 3's supervised tokens at `read_share` 0.5 (a request's answer is
  1-3 tokens, a transcription 40-100), but stage 3 alone without them (`--steps 0,0,300 --read-share 0`) scores
  12.7 % at step 300 with images shuffled scoring the same 12.7 %, family by family: the answers do not depend
  on the picture at all (each question kind gets its prior answer). A 2-D sin-cos initial position table for
  both towers (amplitude 0.2, tried outside the repository; the released towers learn theirs from zeros or
  noise) gave the same: 13.0 %, shuffled 13.0 %.
- Compute: three times the stage-3 steps on never-repeating images (`--steps 60,60,3000 --stream`) reaches
  21.0 % (images shuffled 14.0 %) against 17.7 % for the default. The gain is in chart (42 %), ui (28 %) and
  scene (36 %); document, table and map, whose answers are printed text, stay at the shuffled level: reading
  small text from random weights is what this budget does not reach.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dsvl_jax.config import SamConfig, SiglipConfig, TextConfig, VLMConfig
from dsvl_jax.train import stages
from dsvl_jax.train.config_base import base


@dataclasses.dataclass(frozen=True)
class ModelSize:
    image_size: int = 96  # SAM input (the image the processor delivers); SigLIP sees image_size // 2
    patch_size: int = 8
    sam_width: int = 64
    sam_layers: int = 4
    siglip_width: int = 64
    siglip_layers: int = 2
    lm_width: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    context: int = 256


def demo_model(vocab_size: int, image_token_id: int, token_merge: int = 1, size: ModelSize = ModelSize()
               ) -> VLMConfig:
    s = size
    low = s.image_size // 2
    if s.image_size % (2 * s.patch_size) or (low // s.patch_size) % 2:
        raise ValueError(f"image_size={s.image_size} must be a multiple of 4 × patch_size={s.patch_size} "
                         "(an even SigLIP grid at half resolution)")
    sam_grid = s.image_size // s.patch_size
    return VLMConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=s.lm_width, intermediate_size=2 * s.lm_width,
                        num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads,
                        num_key_value_heads=s.lm_heads, head_dim=s.lm_width // s.lm_heads,
                        max_position_embeddings=s.context),
        siglip=SiglipConfig(hidden_size=s.siglip_width, intermediate_size=2 * s.siglip_width,
                            num_hidden_layers=s.siglip_layers, num_attention_heads=max(1, s.siglip_width // 32),
                            image_size=low, patch_size=s.patch_size),
        sam=SamConfig(hidden_size=s.sam_width, mlp_dim=2 * s.sam_width, num_hidden_layers=s.sam_layers,
                      num_attention_heads=max(1, s.sam_width // 32), image_size=s.image_size,
                      patch_size=s.patch_size, window_size=max(2, sam_grid // 2),
                      global_attn_indexes=tuple(range(1, s.sam_layers, 2)), output_channels=s.lm_width // 4),
        adapter="low_high_hybrid_split_mlp_gelu",
        image_token_id=image_token_id,
        token_merge=token_merge,
    )


# Stage 0 (the demo's own): every group from random weights, to earn what the paper starts from.
STAGE_GROUPS = {0: tuple(stages.GROUPS), **stages.STAGE_GROUPS}


def stage_config(stage: int, model: VLMConfig, *, tokenizer: str, sources: list[dict], tasks: tuple[str, ...],
                 steps: int, batch: int, seq_len: int, lr: float, seed: int, init_from: str = "",
                 train_sam: bool = False, warmup: int = 0, pack: bool = False, mm_warmup: int = 0,
                 images_per_row: int = 1, task_tags: bool = False, weight_decay: float = 0.0,
                 lr_mult: dict | None = None, lora_rank: int = 0) -> ml_collections.ConfigDict:
    c = base(model)
    c.stage = stage
    groups = STAGE_GROUPS[stage] + (("sam",) if train_sam and stage == 3 else ())
    c.trainable = groups
    c.init.from_checkpoint = init_from
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.devices = 1, 1, 1, 1
    c.batch_size, c.seq_len, c.total_steps = batch, seq_len, steps
    c.seed = seed
    c.loss_chunk = seq_len
    c.optimizer.lr = lr
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = warmup or max(1, steps // 20)
    c.optimizer.end_factor = 0.05
    c.optimizer.weight_decay = weight_decay
    c.optimizer.lr_mult = dict(lr_mult or {})
    c.data.tokenizer = tokenizer
    c.data.sources = sources
    c.data.tasks = tuple(tasks)
    c.data.pack = pack
    c.data.mm_warmup_steps = mm_warmup
    c.data.max_images_per_row = images_per_row
    c.data.task_tag_prompt = task_tags
    if lora_rank and stage == 3:
        # LoRA SFT (`--lora R`): rank-R adapters (alpha 2R) on every LLM projection instead of the LLM in full; the
        # stage's other groups (adaptor, SigLIP, SAM: from scratch here) train in full, as `config_base.lora_sft`
        # trains the adaptor. Same data, steps and learning rate as full stage 3, so the two compare.
        c.lora.rank, c.lora.alpha, c.lora.dropout = lora_rank, 2.0 * lora_rank, 0.0
        c.lora.targets, c.lora.full = ("llm",), tuple(g for g in groups if g != "llm")
    c.checkpoint.every = steps
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.log_every = max(1, min(25, steps // 8))
    return c
