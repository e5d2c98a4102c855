"""Metrics to the console (a progress bar), to TensorBoard and to `metrics.jsonl` in the workdir."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, *, tensorboard: bool = True,
                 progress: bool = True):
        self.is_main = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not self.is_main:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def write(self, step: int, scalars: dict, prefix: str = "train"):
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
        self.jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(),
                                     **{k: (v if np.isfinite(v) else str(v)) for k, v in clean.items()}}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if np.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix({k: f"{clean[k]:.4g}" for k in ("loss", "grad_norm", "mfu") if k in clean},
                                 refresh=False)

    def text(self, step: int, tag: str, text: str):
        if self.is_main and self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.is_main:
            self.jsonl.write(json.dumps({"step": step, "split": "text", "tag": tag, "text": text}) + "\n")
            self.jsonl.flush()

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def log(self, msg: str):
        if self.is_main:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
