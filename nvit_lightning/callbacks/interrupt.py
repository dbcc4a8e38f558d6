"""Checkpoints that lose nothing: after every pruning event, and when the run is stopped.

An epoch on ImageNet takes hours; a pre-empted job (SIGTERM) or a Ctrl-C (SIGINT) must not lose them.
On either signal the current batch finishes (a batch cut in half, e.g. mid optimizer step, would save
half-updated weights), this callback writes `dirpath/last.ckpt` after every other callback has seen
the batch, and the run stops with `TrainingInterrupted`. A second Ctrl-C aborts at once. Under DDP the
ranks agree on the stop (any rank's signal counts) so they all write the same step.

The checkpoint holds the RNG states too, and the train loader of a resumed fit skips the batches of
the epoch already trained on (`ViTDataModule.train_dataloader`): `ckpt_path=last` then goes on
exactly as the uninterrupted run would have (single device; under DDP the epoch's data restarts).
Lightning writes checkpoints atomically (a temporary file, then a rename), and every file keeps its
previous version beside it (`last.previous.ckpt`, `resume.KeepPreviousCheckpointIO`): a `last.ckpt`
damaged later (a full disk, a bad copy) falls back to it on `ckpt_path=last`.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from .pruning import GlobalPruning

log = logging.getLogger("nvit_lightning")

SIGNAL_EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal after writing `checkpoint` (exit status 128 + the signal)."""

    def __init__(self, signal_name: str, checkpoint: Path, step: int) -> None:
        super().__init__(SIGNAL_EXIT_CODES[signal_name])
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step

    def __str__(self) -> str:
        return (f"{self.signal_name} at step {self.step}: checkpoint written to {self.checkpoint}; resume with "
                f"hydra.run.dir=<this run> ckpt_path=last")


class InterruptCheckpoint(Checkpoint):
    """Write `dirpath/filename` after every pruning event and on SIGINT / SIGTERM (then stop).

    A `Checkpoint` subclass, so Lightning runs it after all other callbacks at every batch end: the
    checkpoint holds the state the next batch would start from.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt", on_events: bool = True) -> None:
        super().__init__()
        self.dirpath, self.filename = str(dirpath), filename  # dirpath: as ModelCheckpoint's
        self.on_events = on_events
        self.signal_name: str | None = None
        self._previous_handler: Any = None

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / self.filename

    # ---- signals ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal_name = None
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # the second Ctrl-C: stop now, no checkpoint
            raise KeyboardInterrupt
        self.signal_name = "SIGINT"
        log.warning("SIGINT: finishing the current batch, then writing a checkpoint (Ctrl-C again to abort now)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # ---- the loop ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.on_events and self._pruned_now(trainer):
            trainer.save_checkpoint(self.path, weights_only=False)
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the epoch-end validation

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        # Lightning's own SIGTERM handler only raises a flag, acted on later: we stop first, saved
        signal_name = self.signal_name or ("SIGTERM" if trainer.received_sigterm else None)
        if not trainer.strategy.reduce_boolean_decision(signal_name is not None, all=False):
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        error = TrainingInterrupted(signal_name or "SIGTERM", self.path, trainer.global_step)
        if trainer.is_global_zero:
            log.warning(str(error))
        raise error

    @staticmethod
    def _pruned_now(trainer: L.Trainer) -> bool:
        return any(isinstance(cb, GlobalPruning) and cb.history and cb.last_event_step == trainer.global_step
                   for cb in trainer.callbacks)

    # ---- checkpoint state: the RNGs, so a resumed run draws what the uninterrupted one would ----------
    def state_dict(self) -> dict[str, Any]:
        kind, key, pos, has_gauss, gauss = np.random.get_state()
        # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]}
        if torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            kind, key, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
