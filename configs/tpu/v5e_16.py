r"""v5e-16 (v5litepod-16): 16 v5e chips (16 GiB HBM, 197 bf16 TFLOP/s each) on 4 hosts; topology v5e:4x4.
The 1.3B on the cheapest multi-host slice.

    python tpu/launch.py --zone us-west4-a --name dsvl --accelerator v5e-16 --spot all -- \
        --config configs/tpu/v5e_16.py:1p3b_stage2,data=/mnt/gcs/dsvl/mixture.json --workdir /mnt/gcs/dsvl/runs/1p3b_s2

Each variant keeps the paper's global batch and schedule (configs/deepseek_vl_*.py) and is laid out FSDP over
the slice. Figures: `python tpu/compile_all.py --only v5e_16` (ahead-of-time compile for v5e:4x4; the step
time assumes 40% MFU, see tpu/compile_all.py; FLOPs from dsvl_jax.train.flops):
  1p3b_stage2: 1,024 rows x 4,096 tokens in 64 micro-batches (16 rows live, 1 a chip), remat full
      15.1 of 16 GiB a chip (arguments 1.7, temporaries 13.4); 4.81e+16 model FLOP/step
      at 40% MFU: 38.1 s/step, 6,874 tokens/s/chip (HFU 51%); the paper's 96,000 steps in 42.4 days
"""
from dsvl_jax.train.config_files import Layout, slice_config

ACCELERATOR = "v5litepod-16"
TOPOLOGY = "v5e:4x4"
LAYOUTS = {
    "1p3b_stage2": Layout(mesh=(1, -1, 1), grad_accum=64, remat="full"),  # 1,024 x 4,096: 16 live, 1 a chip
}


def get_config(arg: str = "1p3b_stage2"):
    return slice_config(arg, LAYOUTS, __file__)
