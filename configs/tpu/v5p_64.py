r"""v5p-64: 32 v5p chips (95 GiB HBM, 459 bf16 TFLOP/s each) on 8 hosts; topology v5p:4x4x2. The 7B's slice.

    python tpu/launch.py --zone us-east5-a --name dsvl --accelerator v5p-64 --spot --queued all -- \
        --config configs/tpu/v5p_64.py:7b_stage2,data=/mnt/gcs/dsvl/mixture.json \
        --workdir /mnt/gcs/dsvl/runs/7b_s2 --config.init.from_checkpoint=/mnt/gcs/dsvl/runs/7b_s1

Each variant keeps the paper's global batch and schedule (configs/deepseek_vl_*.py) and is laid out FSDP over
the slice. Figures: `python tpu/compile_all.py --only v5p_64` (ahead-of-time compile for v5p:4x4x2; the step
time assumes 40% MFU, see tpu/compile_all.py; FLOPs from dsvl_jax.train.flops):
  7b_stage1: 256 rows x 1,024 tokens in 1 micro-batches (256 rows live, 8 a chip), remat dots_no_batch
      26.8 of 95 GiB a chip (arguments 1.0, temporaries 25.6); 7.59e+15 model FLOP/step
      at 40% MFU: 1.3 s/step, 6,341 tokens/s/chip (HFU 42%); the paper's 15,000 steps in 0.2 days
  7b_stage2: 2,304 rows x 4,096 tokens in 36 micro-batches (64 rows live, 2 a chip), remat dots_no_batch
      51.1 of 95 GiB a chip (arguments 6.3, temporaries 44.5); 4.39e+17 model FLOP/step
      at 40% MFU: 74.6 s/step, 3,951 tokens/s/chip (HFU 42%); the paper's 42,000 steps in 36.3 days
  7b_stage3: 256 rows x 4,096 tokens in 4 micro-batches (64 rows live, 2 a chip), remat dots_no_batch
      50.3 of 95 GiB a chip (arguments 3.0, temporaries 47.0); 4.95e+16 model FLOP/step
      at 40% MFU: 8.4 s/step, 3,889 tokens/s/chip (HFU 42%); the paper's 10,000 steps in 1.0 days
"""
from dsvl_jax.train.config_files import Layout, slice_config

ACCELERATOR = "v5p-64"
TOPOLOGY = "v5p:4x4x2"
LAYOUTS = {
    "7b_stage1": Layout(mesh=(1, -1, 1), grad_accum=1),  # 256 rows x 1,024 tokens, all live: 8 a chip
    "7b_stage2": Layout(mesh=(1, -1, 1), grad_accum=36),  # 2,304 rows x 4,096: 64 live, 2 a chip
    "7b_stage3": Layout(mesh=(1, -1, 1), grad_accum=4),  # 256 rows x 4,096: 64 live, 2 a chip
}


def get_config(arg: str = "7b_stage2"):
    return slice_config(arg, LAYOUTS, __file__)
