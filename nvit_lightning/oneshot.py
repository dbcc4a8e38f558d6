"""One-/few-shot pruning pieces shared by prune.py and the benchmarks: saliency on calibration
batches, and a short recovery fine-tune of the compact model with KL to the dense one."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .models import PrunableViT
from .module import NViTModule
from .pruning import Criterion


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


def recover(student: PrunableViT, teacher: PrunableViT, datamodule: L.LightningDataModule,
            trainer: L.Trainer, optimizer: Callable[..., torch.optim.Optimizer], kl_weight: float,
            temperature: float, label_smoothing: float = 0.0) -> PrunableViT:
    """Fine-tune `student` for the trainer's `max_steps` with KL to the frozen `teacher` (a fresh
    optimizer); returns the student, left in eval mode."""
    module = NViTModule(student, optimizer=optimizer, kl_weight=kl_weight, temperature=temperature,
                        kl_from_start=True, teacher=teacher, label_smoothing=label_smoothing)
    trainer.fit(module, datamodule=datamodule)
    return module.student.eval()
