"""One-/few-shot pruning pieces shared by prune.py and the benchmarks: saliency on calibration
batches, and a short recovery fine-tune of the compact model with KL to the dense one."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .models import PrunableViT
from .module import NViTModule
from .pruning import Criterion, GlobalPruner, PruningEvent, prune_to_targets
from .pruning.latency import LatencyModel
from .pruning.reconstruct import Reconstruction
from .pruning.search import LatencySearch
from .report import target_name


def calibrator(model: PrunableViT, batches: Iterable[tuple[Tensor, Tensor]], criterion: Criterion,
               device: str | torch.device = "cpu") -> Callable[[], None]:
    """A `calibrate()` for `prune_to_targets`: forward/backward over the batches, feeding the
    criterion after each backward."""

    def calibrate() -> None:
        model.to(device).eval()  # no dropout: saliency of the function that is actually pruned
        for images, labels in tqdm(batches, desc="saliency", leave=False):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images.to(device)), labels.to(device)).backward()
            criterion.accumulate()
        model.zero_grad(set_to_none=True)

    return calibrate


def prune_one_shot(model: PrunableViT, reference: PrunableViT, pruner: GlobalPruner, criterion: Criterion,
                   batches: Sequence[tuple[Tensor, Tensor]], calib_batches: int, rescore_batches: int,
                   rescore: bool = True, reconstruction: Reconstruction | None = None,
                   on_target: Callable[[float, PrunableViT], None] | None = None,
                   on_event: Callable[[PruningEvent], None] | None = None,
                   device: str | torch.device = "cpu") -> list[PruningEvent]:
    """Prune the masked `model` through every target of `pruner` from saliency on calibration
    `batches` (the first `calib_batches` to score, the first `rescore_batches` to re-score before
    each later event). At each target reached, `on_target(target, snapshot)` gets a copy of the
    masked model, refit by `reconstruction` against `reference` (the unpruned model) when given.
    The model itself is never refit, so its pruning path does not depend on the reconstruction."""
    def reached(event: PruningEvent) -> None:
        if on_event is not None:
            on_event(event)
        for target in event.targets_reached:
            if on_target is None:
                continue
            snapshot = copy.deepcopy(model)
            if reconstruction is not None:
                reconstruction(snapshot, reference, batches, device)
            on_target(target, snapshot)

    return prune_to_targets(pruner, criterion, calibrator(model, batches[:calib_batches], criterion, device),
                            rescore, reached, recalibrate=calibrator(model, batches[:rescore_batches], criterion,
                                                                     device))


def snapshot_path(directory: str | Path, target: float) -> Path:
    """Where the compact model of a latency target goes: `<directory>/target_<t>`."""
    return Path(directory) / target_name(target)


def search_and_refit(search: LatencySearch, model: PrunableViT, reference: PrunableViT,
                     latency_model: LatencyModel, batches: Sequence[tuple[Tensor, Tensor]], calib_batches: int,
                     reconstruction: Reconstruction | None = None, device: str | torch.device = "cpu",
                     snapshot_dir: str | Path | None = None, progress: bool = True) -> dict[float, PrunableViT]:
    """`pruner=obs_search`: every target of `search` from the first `calib_batches` calibration
    batches, each refit by `reconstruction` against `reference` (the unpruned model), compacted, and
    saved under `snapshot_dir` (when given). Returns the compact models by target."""
    compacts = {}
    pruned = search(model, latency_model, batches[:calib_batches], device, progress)
    for target, masked in pruned.items():
        if reconstruction is not None:
            reconstruction(masked, reference, batches, device, progress)
        compacts[target] = masked.compact().eval()
        if snapshot_dir is not None:
            compacts[target].save_pretrained(snapshot_path(snapshot_dir, target))
    return compacts


def recover(student: PrunableViT, teacher: PrunableViT, datamodule: L.LightningDataModule,
            trainer: L.Trainer, optimizer: Callable[..., torch.optim.Optimizer], kl_weight: float,
            temperature: float, label_smoothing: float = 0.0, max_nonfinite_skips: int = 0) -> PrunableViT:
    """Fine-tune `student` for the trainer's `max_steps` with KL to the frozen `teacher` (a fresh
    optimizer); returns the student, left in eval mode."""
    module = NViTModule(student, optimizer=optimizer, kl_weight=kl_weight, temperature=temperature,
                        kl_from_start=True, teacher=teacher, label_smoothing=label_smoothing, stage="recover")
    trainer.fit(module, datamodule=datamodule)
    return module.student.eval()
