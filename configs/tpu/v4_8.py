r"""v4-8: 4 v4 chips (32 GiB HBM, 275 bf16 TFLOP/s each; JAX sees one megacore device a chip) on 1 host;
topology v4:2x2x1. The 1.3B at the paper's batch, more slowly than on v5p.

    python tpu/launch.py --zone us-central2-b --name dsvl --accelerator v4-8 all -- \
        --config configs/tpu/v4_8.py:1p3b_stage2,data=/mnt/gcs/dsvl/mixture.json --workdir /mnt/gcs/dsvl/runs/1p3b_s2

Each variant keeps the paper's global batch and schedule (configs/deepseek_vl_*.py) and is laid out FSDP over
the slice. Figures: `python tpu/compile_all.py --only v4_8` (ahead-of-time compile for v4:2x2x1; the step
time assumes 40% MFU, see tpu/compile_all.py; FLOPs from dsvl_jax.train.flops):
  1p3b_stage2: 1,024 rows x 4,096 tokens in 64 micro-batches (16 rows live, 4 a chip), remat full
      24.8 of 32 GiB a chip (arguments 3.3, temporaries 9.0); 4.81e+16 model FLOP/step
      at 40% MFU: 109.3 s/step, 9,595 tokens/s/chip (HFU 51%); the paper's 96,000 steps in 121.4 days
  (libtpu describes v4 per TensorCore, so the compile lays FSDP over 8 TensorCores and adds each chip's
  two programs up; on the VM JAX runs one megacore device a chip and the mesh is fsdp=4.)
"""
from dsvl_jax.train.config_files import Layout, slice_config

ACCELERATOR = "v4-8"
TOPOLOGY = "v4:2x2x1"
LAYOUTS = {
    "1p3b_stage2": Layout(mesh=(1, -1, 1), grad_accum=64, remat="full"),  # 1,024 x 4,096: 16 live, 4 a chip
}


def get_config(arg: str = "1p3b_stage2"):
    return slice_config(arg, LAYOUTS, __file__)
