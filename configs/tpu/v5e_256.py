r"""v5e-256 (v5litepod-256): 256 v5e chips (16 GiB HBM, 197 bf16 TFLOP/s each) on 64 hosts; topology v5e:16x16.
The 7B's stage 2 on a full v5e pod: one row per chip per micro-batch, full remat (16 GiB is tight).

    python tpu/launch.py --zone us-west4-a --name dsvl --accelerator v5e-256 --spot --queued all -- \
        --config configs/tpu/v5e_256.py:7b_stage2,data=/mnt/gcs/dsvl/mixture.json \
        --workdir /mnt/gcs/dsvl/runs/7b_s2 --config.init.from_checkpoint=/mnt/gcs/dsvl/runs/7b_s1

Each variant keeps the paper's global batch and schedule (configs/deepseek_vl_*.py) and is laid out FSDP over
the slice. Figures: `python tpu/compile_all.py --only v5e_256` (ahead-of-time compile for v5e:16x16; the step
time assumes 40% MFU, see tpu/compile_all.py; FLOPs from dsvl_jax.train.flops):
  7b_stage2: 2,304 rows x 4,096 tokens in 9 micro-batches (256 rows live, 1 a chip), remat full
      8.8 of 16 GiB a chip (arguments 0.8, temporaries 7.9); 4.39e+17 model FLOP/step
      at 40% MFU: 21.7 s/step, 1,696 tokens/s/chip (HFU 51%); the paper's 42,000 steps in 10.6 days
"""
from dsvl_jax.train.config_files import Layout, slice_config

ACCELERATOR = "v5litepod-256"
TOPOLOGY = "v5e:16x16"
LAYOUTS = {
    "7b_stage2": Layout(mesh=(1, -1, 1), grad_accum=9, remat="full"),  # 2,304 rows x 4,096: 256 live, 1 a chip
}


def get_config(arg: str = "7b_stage2"):
    return slice_config(arg, LAYOUTS, __file__)
