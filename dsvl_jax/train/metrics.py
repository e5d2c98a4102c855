"""Metrics to the console (a progress bar), to TensorBoard and to `metrics.jsonl` in the workdir.

A run that starts at step N (resumed from checkpoint N, or N = 0) first drops what an earlier run logged
after step N (it was not checkpointed, and the steps are done again), so no step appears twice.
"""
from __future__ import annotations

import json
import os
import re
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
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_rows_after(path, start_step)
        self.jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard hides the earlier runs' events from this step on
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
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
                    self.tb.add_scalar(tag(f"{prefix}/{k}"), v, step)
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix({k: f"{clean[k]:.4g}" for k in ("loss", "grad_norm", "mfu") if k in clean},
                                 refresh=False)

    def text(self, step: int, name: str, text: str):
        if self.is_main and self.tb is not None:
            self.tb.add_text(tag(name), text, step)
        if self.is_main:
            self.jsonl.write(json.dumps({"step": step, "split": "text", "tag": name, "text": text}) + "\n")
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


_NOT_IN_TAGS = re.compile(r"[^-/\w.]")  # what TensorBoard replaces (with a log line each time)


def tag(name: str) -> str:
    """A TensorBoard-legal name: `data/skipped/nothing supervised within seq_len` → `..._within_seq_len`."""
    return _NOT_IN_TAGS.sub("_", name).lstrip("/")


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrite metrics.jsonl without rows logged after `step` (and without a line cut short by a kill)."""
    if not os.path.exists(path):
        return
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if row.get("step", 0) > step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
