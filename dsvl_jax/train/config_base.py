"""The base training config every config file starts from; every key a run may set lives here.

Unknown keys are an error (`dsvl_jax.train.validate`), so a typo never silently does nothing.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dsvl_jax.config import VLMConfig


def base(model: VLMConfig) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(model.to_dict())
    c.stage = 1
    c.trainable = ()  # explicit groups/prefixes (adaptor, llm, siglip, sam, or param paths); () = the stage's set
    c.init = ml_collections.ConfigDict(dict(
        from_checkpoint="",  # an earlier stage's workdir (Orbax): params only
        from_checkpoint_step=-1,  # -1 = latest
        from_pretrained="",  # a PyTorch checkpoint folder (HF-port or official layout)
        reinit=(),  # param path prefixes to take from a fresh init instead
    ))
    # LoRA (rank > 0): low-rank adapters on the `targets` dense layers (groups llm, llm_attn, llm_mlp, siglip_attn,
    # siglip_mlp, adaptor, or dense-layer paths / 're:' regexes) are trained; the base is frozen except the groups
    # or paths in `full` (e.g. ("adaptor",)), trained in full; `stage` and `trainable` are then not used.
    # from_peft: a PEFT adapter folder (dsvl-convert --to peft) to start the adapters from.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=("llm",), full=(),
                                            from_peft=""))
    # devices: 0 = all. slices > 1: data/fsdp/tensor are per slice; the data axis spans the slices over DCN.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, devices=0, slices=1))
    c.batch_size = 256  # global, in rows
    c.seq_len = 1024
    c.total_steps = 1000  # the schedule's length (warm-up, decay) and where the run ends
    # Stop (and save) at this step although the schedule runs to total_steps; run again with a later
    # stop_at_step (or 0) to go on: e.g. train in chunks and score each checkpoint. 0 = total_steps.
    c.stop_at_step = 0
    c.grad_accum = 1
    c.loss_chunk = 512
    c.seed = 0
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, schedule="cosine", warmup_steps=128, end_factor=0.1, milestones=(), step_factor=0.1,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0, mu_dtype="float32",
        lr_mult={}))  # per-group learning-rate factors, e.g. {"siglip": 2.0} (groups: adaptor, llm, siglip, sam)
    c.data = ml_collections.ConfigDict(dict(
        tokenizer="",  # tokenizer.json or sentencepiece .model
        sources=[],  # [{name, paths | tfds_dir, weight, modality: text | multimodal}]
        eval_sources=[],
        # The same as JSON strings, for the command line (ml_collections cannot parse a list of dicts there):
        # --config.data.sources_json='[{"name": "mm", "paths": "data/mm-*.array_record"}]'. Non-empty wins.
        sources_json="",
        eval_sources_json="",
        pack=False,
        mm_warmup_steps=0,
        modality_grouping=False,
        max_images_per_row=1,
        max_examples_per_row=16,
        long_examples="split",
        tasks=(),  # task tags beyond the pipeline's defaults
        task_tag_prompt=False,  # put each conversation's task tag ("[chart] ") in front of its instruction
        workers=0,
        shard_count=0,  # disjoint data shards, a multiple of the process count (0 = one per process); fixing
                        # it makes the batches independent of how many hosts read them
        # stop with an error when a stream skips this many records in a row (none fits seq_len, say) instead
        # of reading forever; 0 = no limit. Unset: the data loader's default (DataConfig.max_skips_in_a_row).
        max_skips_in_a_row=config_dict.placeholder(int),
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    c.log_every = 10
    c.eval_every = 0
    c.eval_steps = 8
    # Benchmarks scored on the live params with dsvl-eval's formats, runner and metrics (`train/benchmarks.py`):
    # [{name, format, data, limit, batch, max_new_tokens, max_images, system_prompt}], e.g.
    # {"name": "suite", "format": "suite", "data": "heldout:60"}. Unlike eval_sources (a loss), a score.
    c.benchmarks = []
    c.benchmarks_json = ""  # the same as a JSON string, for the command line; non-empty wins
    c.benchmark_every = 0  # steps; 0 = off
    c.keep_best = ""  # a benchmark metric, e.g. "suite/score": its best step's params go to workdir/best/
    c.sample_every = 0
    c.num_samples = 2
    c.max_bad_steps = 8  # stop after this many non-finite steps in a row
    c.peak_tflops = 0.0  # per device, for MFU; 0 = look up the device kind
    return c


def paper_stage(c, *, stage: int, lr: float, schedule: str, warmup: int, steps: int, batch: int, seq_len: int,
                pack: bool):
    """Table 4 of the paper for one stage (AdamW β 0.9/0.95, clip 1.0, no weight decay everywhere)."""
    c.stage = stage
    c.optimizer.lr, c.optimizer.schedule, c.optimizer.warmup_steps = lr, schedule, warmup
    if schedule == "step":  # milestones are not given in the paper: ×0.1 at 80% and 90% (a common choice)
        c.optimizer.milestones = (0.8, 0.9)
    c.total_steps, c.batch_size, c.seq_len = steps, batch, seq_len
    c.data.pack = pack
    return c


# Paper Table 4, per size and stage: (lr, schedule, warm-up, steps, batch, packing). Sequence length 4,096
# in stages 2-3; stage 1 uses 1,024 instead of the paper's 512 because one image alone is 576 tokens.
TABLE4 = {
    "1p3b": {1: (1e-3, "cosine", 128, 15000, 256, False), 2: (3e-5, "step", 2000, 96000, 1024, True),
             3: (2e-5, "cosine", 256, 10000, 256, False)},
    "7b": {1: (1e-3, "cosine", 128, 15000, 256, False), 2: (4.2e-5, "step", 2000, 42000, 2304, True),
           3: (2e-5, "cosine", 256, 10000, 256, False)},
}


def released_size_config(model: VLMConfig, size: str, variant: str) -> ml_collections.ConfigDict:
    """A released model's stage config: bf16 compute on fp32 master weights, FSDP over the slice."""
    stages = {"stage1": 1, "stage2": 2, "stage3": 3}
    if variant not in stages:
        raise ValueError(f"unknown variant {variant!r}: stage1, stage2 or stage3")
    stage = stages[variant]
    c = base(model.replace(dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch"))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    lr, sched, warm, steps, batch, pack = TABLE4[size][stage]
    paper_stage(c, stage=stage, lr=lr, schedule=sched, warmup=warm, steps=steps, batch=batch,
                seq_len=1024 if stage == 1 else 4096, pack=pack)
    if stage == 2:
        c.data.mm_warmup_steps = warm  # the modality warm-up spans the LR warm-up (the paper gives no length)
    if stage > 1:
        c.data.max_images_per_row = 4
    return c


def lora_sft(c, *, rank: int = 16, lr: float = 2e-4):
    """A released size's stage-3 config (SFT data, schedule, batch) turned into LoRA SFT: r=`rank` adapters
    (alpha 2r, dropout 0.05) on every LLM projection, the VL adaptor's MLP (`aligner/`) trained in full (the
    common VLM recipe; whole torch modules, so `dsvl-convert --to peft` carries it), the rest frozen. LoRA takes a ~10x larger learning rate than full fine-tuning (the paper's stage 3: 2e-5)."""
    c.lora.rank, c.lora.alpha, c.lora.dropout = rank, 2.0 * rank, 0.05
    c.lora.targets, c.lora.full = ("llm",), ("aligner/",)
    c.optimizer.lr = lr
    return c
