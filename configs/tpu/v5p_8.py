r"""v5p-8: 4 v5p chips (95 GiB HBM, 459 bf16 TFLOP/s each) on 1 host; topology v5p:2x2x1. The 1.3B's slice
(the 7B's stage 2 does not fit: its fp32 params and Adam state alone take ~50 GiB a chip here).

    python tpu/launch.py --zone us-east5-a --name dsvl --accelerator v5p-8 --spot all -- \
        --config configs/tpu/v5p_8.py:1p3b_stage2,data=/mnt/gcs/dsvl/mixture.json --workdir /mnt/gcs/dsvl/runs/1p3b_s2

Each variant keeps the paper's global batch and schedule (configs/deepseek_vl_*.py) and is laid out FSDP over
the slice. Figures: `python tpu/compile_all.py --only v5p_8` (ahead-of-time compile for v5p:2x2x1; the step
time assumes 40% MFU, see tpu/compile_all.py; FLOPs from dsvl_jax.train.flops):
  1p3b_stage2: 1,024 rows x 4,096 tokens in 32 micro-batches (32 rows live, 8 a chip), remat dots_no_batch
      82.2 of 95 GiB a chip (arguments 6.6, temporaries 75.5); 4.81e+16 model FLOP/step
      at 40% MFU: 65.5 s/step, 16,015 tokens/s/chip (HFU 44%); the paper's 96,000 steps in 72.7 days
"""
from dsvl_jax.train.config_files import Layout, slice_config

ACCELERATOR = "v5p-8"
TOPOLOGY = "v5p:2x2x1"
LAYOUTS = {
    "1p3b_stage2": Layout(mesh=(1, -1, 1), grad_accum=32),  # 1,024 rows x 4,096: 32 live, 8 a chip
}


def get_config(arg: str = "1p3b_stage2"):
    return slice_config(arg, LAYOUTS, __file__)
