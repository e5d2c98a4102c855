"""Orbax checkpoints of training: the state and the data iterator side by side, async saves every N
steps, keep-N, resume from the latest *complete* step (Orbax finalises a step by an atomic rename, so a
save cut short is never picked), restore onto any mesh, and SIGTERM / SIGINT → save and exit (preemption).
A LoRA run's checkpoints (`frozen_mask` given) hold the frozen base apart, written once: `lora_checkpoint`."""
from __future__ import annotations

import logging
import os
import signal
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dsvl_jax.convert import orbax_io
from dsvl_jax.train import lora_checkpoint

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True, frozen_mask=None):
        """`frozen_mask`: a LoRA run's trainable-params mask (True: trained in full); the params it leaves False
        are saved once to workdir/lora_base rather than in every step (`lora_checkpoint`)."""
        self.every = every
        self.workdir = workdir
        self.frozen_mask = frozen_mask
        self._base_saved = False  # by this run: at its first save, or found on restore
        # Folders are made in save() itself, so an unwritable workdir fails there at once with its OS error
        # (made asynchronously, the failure left the Grain item waiting minutes for a "directory created"
        # signal, then reported only that timeout). The data is still written in the background.
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.manager = orbax_io.checkpoint_manager(workdir, opts)
        self._in_flight = None  # the step of the last async save started

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
        self.wait()  # (Orbax waits here anyway) a failed previous save is reported under its own step
        if self.frozen_mask is not None:
            state, frozen = lora_checkpoint.split(state, self.frozen_mask)
            if not self._base_saved:
                try:
                    lora_checkpoint.save_base(self.workdir, frozen)
                except (OSError, ValueError) as e:
                    raise CheckpointSaveError(f"saving the frozen base under {lora_checkpoint.base_dir(self.workdir)} "
                                              f"failed: {e}") from e
                self._base_saved = True
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        # unwritable or full workdir: a clear error; the previous checkpoint stays intact. Tensorstore reports
        # I/O errors (e.g. ENOSPC) as ValueError; an async save's error surfaces at the next save or wait.
        except (OSError, ValueError) as e:
            raise CheckpointSaveError(f"saving checkpoint {step} under {self.manager.directory} failed: {e}") from e
        self._in_flight = step
        return saved

    def saved_param_shapes(self, step: int) -> dict[str, tuple]:
        """{param path: shape} of checkpoint `step`, from its metadata alone (nothing is restored)."""
        meta = ocp.PyTreeCheckpointer().metadata(os.path.join(str(self.manager.directory), str(step), "state"))
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        shapes = lora_checkpoint.base_shapes(self.workdir) if self.frozen_mask is not None and \
            self.base_apart(step) else {}
        shapes.update({k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree["params"], sep="/").items()})
        return shapes

    def has_adapters(self, step: int) -> bool:
        """Whether checkpoint `step` is a LoRA run's (its state holds "lora"), from its metadata alone."""
        meta = ocp.PyTreeCheckpointer().metadata(os.path.join(str(self.manager.directory), str(step), "state"))
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        return "lora" in tree

    def restore(self, step: int, abstract_state, data_iter=None):
        """State restored onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
        frozen = None
        if self.frozen_mask is not None:
            abstract_state, abstract_frozen = lora_checkpoint.split(abstract_state, self.frozen_mask)
            if self.base_apart(step):
                frozen = lora_checkpoint.restore_base(self.workdir, abstract_frozen)
            else:  # written before the split, the whole params in the step: the next save writes the base
                abstract_state = lora_checkpoint.join(abstract_state, abstract_frozen)
            self._base_saved = frozen is not None
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"] if frozen is None else lora_checkpoint.join(restored["state"], frozen)

    def base_apart(self, step: int) -> bool:
        """Whether a LoRA run's checkpoint `step` lacks frozen params (they are in workdir/lora_base)."""
        meta = ocp.PyTreeCheckpointer().metadata(os.path.join(str(self.manager.directory), str(step), "state"))
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        saved = traverse_util.flatten_dict(tree["params"], sep="/")
        return any(not v for k, v in traverse_util.flatten_dict(self.frozen_mask, sep="/").items() if k not in saved)

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            raise CheckpointSaveError(f"finishing checkpoint {self._in_flight} under {self.manager.directory} "
                                      f"failed: {e}") from e

    def close(self):
        try:
            self.manager.close()  # waits for a save in flight
        except (OSError, ValueError) as e:
            raise CheckpointSaveError(f"finishing checkpoint {self._in_flight} under {self.manager.directory} "
                                      f"failed: {e}") from e


class CheckpointSaveError(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """A signal arrived before training started (nothing to save); `signum` names it. A KeyboardInterrupt, so
    that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} during start-up")


class Preemption:
    """SIGTERM and SIGINT (Ctrl-C) alike. Before `arm()` (start-up: nothing new to save) they raise
    `Interrupted` at once. Once armed they set a flag the loop checks once per step (every process agrees on
    it before acting, so all save the same step) and that the data pipeline polls while it skips records; a
    second SIGINT raises KeyboardInterrupt (Ctrl-C twice: stop without saving)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._flag = threading.Event()
        self.signum: int | None = None  # the first signal received once armed
        self._armed = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)

    def arm(self):
        self._armed = True

    def _handler(self, signum, frame):
        if not self._armed:
            raise Interrupted(signum)
        if self._flag.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        log.warning("%s received: will save a checkpoint and exit after this step", signal.Signals(signum).name)
        self.signum = signum
        self._flag.set()

    def local(self) -> bool:
        """This process's flag alone (no collective: safe to poll anywhere)."""
        return self._flag.is_set()

    def requested(self) -> bool:
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray([local]))))

    def restore_handlers(self):
        for s, h in self._old.items():
            signal.signal(s, h)
