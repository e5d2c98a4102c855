"""Orbax checkpoints of training: the state and the data iterator side by side, async saves every N
steps, keep-N, resume from the latest *complete* step (Orbax finalises a step by an atomic rename, so a
save cut short is never picked), restore onto any mesh, and SIGTERM → save and exit (preemption)."""
from __future__ import annotations

import logging
import os
import signal
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from dsvl_jax.convert import orbax_io

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.every = every
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True)
        self.manager = orbax_io.checkpoint_manager(workdir, opts)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except OSError as e:  # unwritable or full workdir: a clear error; the previous checkpoint stays intact
            raise CheckpointSaveError(f"saving checkpoint {step} under {self.manager.directory} failed: {e}") from e

    def restore(self, step: int, abstract_state, data_iter=None):
        """State restored onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise CheckpointSaveError(f"finishing a checkpoint under {self.manager.directory} failed: {e}") from e

    def close(self):
        self.manager.close()


class CheckpointSaveError(RuntimeError):
    pass


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) of a live state: the restore target for this mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Preemption:
    """SIGTERM (and SIGINT when asked) set a flag the loop checks once per step; every process agrees
    on it before acting, so all save the same step."""

    def __init__(self, also_sigint: bool = False):
        self._flag = threading.Event()
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            sigs = [signal.SIGTERM] + ([signal.SIGINT] if also_sigint else [])
            for s in sigs:
                self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        log.warning("signal %d received: will save a checkpoint and exit after this step", signum)
        self._flag.set()

    def requested(self) -> bool:
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray([local]))))

    def restore_handlers(self):
        for s, h in self._old.items():
            signal.signal(s, h)
