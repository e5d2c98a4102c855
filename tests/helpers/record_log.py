"""The record-id log the data tests read, kept out of the trainer: one JSON line per batch the training
iterator yields, {"step": s, "codes": [record codes of the batch]}, written (and flushed) before the
trainer dispatches that step.

In a test process: `with logging_records(path): train(config, workdir)`. As the trainer CLI with the log in
WORKDIR/records.<process>.log: `python -m tests.helpers.record_log --config ... --workdir WORKDIR ...`."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from dsvl_jax.data import loader


class _Logged(loader.MixtureBatchIterator):
    def __next__(self):
        step = self.step
        batch = super().__next__()
        codes = batch["record_index"]
        self._record_log.write(json.dumps({"step": step, "codes": codes[codes >= 0].tolist()}) + "\n")
        self._record_log.flush()
        return batch


@contextlib.contextmanager
def logging_records(path):
    """Log the first iterator `make_train_iterator` returns (the trainer's; an eval iterator comes later)
    to `path` (a path, or a callable giving it when that iterator is made)."""
    real = loader.make_train_iterator
    files = []

    def make_train_iterator(*args, **kw):
        it = real(*args, **kw)
        if not files:
            files.append(open(path() if callable(path) else path, "a"))
            it.__class__ = _Logged  # the same object and state, one more side effect per batch
            it._record_log = files[0]
        return it

    loader.make_train_iterator = make_train_iterator
    try:
        yield
    finally:
        loader.make_train_iterator = real
        for f in files:
            f.close()


def _workdir(argv) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
        if a == "--workdir":
            return argv[i + 1]
    raise SystemExit("--workdir is required")


def main():
    import jax

    from dsvl_jax.train import cli

    workdir = _workdir(sys.argv)
    # the process index is known once the CLI has initialised jax.distributed, i.e. when the iterator is made
    with logging_records(lambda: os.path.join(workdir, f"records.{jax.process_index()}.log")):
        cli.run()


if __name__ == "__main__":
    main()
