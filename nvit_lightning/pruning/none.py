"""`pruner=none`: no pruning, so train.py only fine-tunes (stage 2), e.g. a compact model on new data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..latency.models import LatencyModel
from ..models import PrunableViT
from .base import Pruner
from .interrupt import Checkpoint


class NoPruning(Pruner):
    """The pruner that keeps every structure: its one model is the given one, unchanged.

    train.py then runs stage 2 alone on the given model (dense or compact: `model=from_dir`) for
    `schedule.finetune_epochs` epochs with the configured distillation, evaluates it and writes model/
    and report.json like every other run; its latency target is 1.0, all of the model's latency.
    """

    name = "none"

    def __init__(self, target: float = 1.0) -> None:
        if float(target) != 1.0:
            raise ValueError(f"pruner=none keeps the whole model, so its latency target is 1.0 (got "
                             f"pruner.target={target}): pick a pruner, e.g. pruner=obs_search, to prune")
        self.target, self.targets = 1.0, [1.0]

    def calibration_batches(self, calib_batches: int, batch_size: int) -> int:
        return 0

    def __call__(self, model: PrunableViT, latency_model: LatencyModel | None = None,
                 batches: Sequence[Sequence[Tensor]] = (), device: str | torch.device = "cpu",
                 progress: bool = True, checkpoint: Checkpoint | None = None) -> dict[float, PrunableViT]:
        return {1.0: model}
