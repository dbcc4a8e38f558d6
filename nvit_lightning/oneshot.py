"""One-shot pruning pieces shared by train.py, prune.py and the benchmarks: any masked-output pruner
followed by the refit and compaction, the snapshots, and a short recovery fine-tune of the compact
model with KL to the dense one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from .models import PrunableViT
from .module import NViTModule
from .pruning import Pruner
from .pruning.latency import LatencyModel
from .pruning.reconstruct import Reconstruction
from .report import target_name


def snapshot_path(directory: str | Path, target: float) -> Path:
    """Where the compact model of a latency target goes: `<directory>/target_<t>`."""
    return Path(directory) / target_name(target)


def write_snapshot(compact: PrunableViT, directory: str | Path, target: float) -> Path:
    """The one writer of snapshots: the compact model of `target` under `directory`."""
    path = snapshot_path(directory, target)
    compact.save_pretrained(path)
    return path


def prune_and_refit(pruner: Pruner, model: PrunableViT, reference: PrunableViT, latency_model: LatencyModel,
                    batches: Sequence[tuple[Tensor, Tensor]], calib_batches: int,
                    reconstruction: Reconstruction | None = None, device: str | torch.device = "cpu",
                    snapshot_dir: str | Path | None = None, progress: bool = True
                    ) -> tuple[dict[float, PrunableViT], dict[float, str]]:
    """Every target of a masked-output `pruner` from the first `calib_batches` calibration batches,
    each refit by `reconstruction` against `reference` (the unpruned model) and compacted. A model
    that lost something is saved under `snapshot_dir` (when given). Returns the compact models and
    the snapshot paths, by target."""
    compacts, snapshots = {}, {}
    pruned = pruner(model, latency_model, batches[:calib_batches], device, progress)
    for target, masked in pruned.items():
        changed = masked.live_dims() != model.live_dims()
        if reconstruction is not None and changed:
            reconstruction(masked, reference, batches, device, progress)
        compacts[target] = masked.compact().eval()
        if snapshot_dir is not None and changed:
            snapshots[target] = str(write_snapshot(compacts[target], snapshot_dir, target))
    return compacts, snapshots


def recover(student: PrunableViT, teacher: PrunableViT, datamodule: L.LightningDataModule,
            trainer: L.Trainer, optimizer: Callable[..., torch.optim.Optimizer], kl_weight: float,
            temperature: float, label_smoothing: float = 0.0, max_nonfinite_skips: int = 0) -> PrunableViT:
    """Fine-tune `student` for the trainer's `max_steps` with KL to the frozen `teacher` (a fresh
    optimizer); returns the student, left in eval mode."""
    module = NViTModule(student, optimizer=optimizer, kl_weight=kl_weight, temperature=temperature,
                        kl_from_start=True, teacher=teacher, label_smoothing=label_smoothing, stage="recover")
    trainer.fit(module, datamodule=datamodule)
    return module.student.eval()
