"""`dsvl-train --config configs/<file>.py[:variant] --workdir DIR [--config.key=value …]`

big_vision-style: the config file's `get_config(variant)` builds an ml_collections ConfigDict; any key can
be overridden on the command line. Multi-host (TPU pods): pass --distributed (or set DSVL_DISTRIBUTED=1)
and every process calls `jax.distributed.initialize()` before anything else touches JAX.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("DSVL_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (TPU pods / multi-process).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (only off TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (only off TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (only off TPU).")


def main(argv):
    del argv
    import jax
    if _DISTRIBUTED.value:
        kw = {}
        if _COORDINATOR.value:
            kw = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                      process_id=_PROCESS_ID.value)
        jax.distributed.initialize(**kw)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from dsvl_jax.train.trainer import train
    from dsvl_jax.train.validate import ConfigError
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"dsvl-train: config error: {e}", file=sys.stderr)
        sys.exit(2)
    print({k: v for k, v in summary.items() if not isinstance(v, dict)})


def run():
    app.run(main)


if __name__ == "__main__":
    run()
