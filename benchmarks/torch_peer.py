"""Helpers the benchmarks share to build and time the PyTorch peer (transformers' DeepSeek-VL port).

Importing this module has no side effects (no JAX platform is chosen here), so a GPU run can use it too.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.helpers: not installed

from tests.helpers import torch_ref as R  # noqa: E402


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_model(cfg, seed=0):
    """HF model with random weights, built quickly (skipping HF's init, which is not the point here)."""
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration
    klass = DeepseekVLHybridForConditionalGeneration if cfg.is_hybrid else DeepseekVLForConditionalGeneration
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    torch.manual_seed(seed)
    with no_init_weights():  # real buffers (position ids, RoPE frequencies), parameters left to fill below
        model = klass(R.hf_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model
