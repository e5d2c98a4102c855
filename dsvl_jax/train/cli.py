"""`dsvl-train --config configs/<file>.py[:variant] --workdir DIR [--config.key=value …]`

big_vision-style: the config file's `get_config(variant)` builds an ml_collections ConfigDict; any key can
be overridden on the command line. Multi-host (TPU pods): pass --distributed (or set DSVL_DISTRIBUTED=1)
and every process calls `jax.distributed.initialize()` before anything else touches JAX.
"""
from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dsvl_jax.errors import ConfigError
from dsvl_jax.train.checkpointing import CheckpointSaveError
from dsvl_jax.train.trainer import TrainingDiverged, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("DSVL_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (TPU pods / multi-process).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (only off TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (only off TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (only off TPU).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which a process "
                                  "counts as dead and every other process aborts (no hang on a lost host).")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for all processes to join.")


def main(argv):
    del argv
    if _DISTRIBUTED.value:
        kw = dict(heartbeat_timeout_seconds=_HEARTBEAT.value, initialization_timeout=_INIT_TIMEOUT.value)
        if _COORDINATOR.value:
            kw.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                      process_id=_PROCESS_ID.value)
        jax.distributed.initialize(**kw)
        print(f"dsvl-train: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"dsvl-train: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, CheckpointSaveError) as e:  # expected failures: one clear line, no traceback
        print(f"dsvl-train: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print({k: v for k, v in summary.items() if not isinstance(v, dict)})


def run():
    app.run(main)


if __name__ == "__main__":
    run()
