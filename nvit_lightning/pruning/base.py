"""The one call shape of every pruner family, so the entry points hold no per-family branches.

Each `conf/pruner/*.yaml` names its class in `_target_`; the run builds it and calls it once:

    pruner = instantiate(cfg.pruner)
    pruner.check(model, latency_model)                       # before any other work
    pruned = pruner(model, latency_model, batches, device)   # {target: pruned copy of model}

`output` says what the copies are and so how a run finishes them: "masked" copies (structures
masked out) are refit and compacted; "sparse" copies (zeros inside dense layers) are saved as they
are. `gradual` pruners can also prune while train.py fine-tunes (its stage 1). A pruner that
`saves_progress` writes its work so far to the `checkpoint` it is given, step by step, stops between
steps when SIGINT / SIGTERM asked for it (`interrupt.py`), and goes on from what the checkpoint holds;
the others run as one step and ignore it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..latency.models import LatencyModel
from .interrupt import Checkpoint

OUTPUTS = ("masked", "sparse")


class Pruner(ABC):
    """A pruner family. Subclasses set `name`, `targets` (the latency ratios or sparsity levels it
    produces a model for) and, for masked output, `target` (the one whose model goes to model/), and
    implement `__call__`."""

    name: str
    output: ClassVar[str] = "masked"
    gradual: ClassVar[bool] = False
    saves_progress: ClassVar[bool] = False
    # after a call: the model the copies were cut from where it is not the one given (the same function
    # in another basis, e.g. the latency search's rotated stream): the reference their refit must match
    pruned_from: nn.Module | None = None
    targets: list[float]
    target: float

    def check(self, model: nn.Module, latency_model: LatencyModel | None) -> None:
        """Refuse a model this pruner cannot prune or a target it cannot reach, before other work."""

    def calibration_batches(self, calib_batches: int, batch_size: int) -> int:
        """How many calibration batches of `batch_size` images a call reads (`calib_batches`: the
        run's setting for pruners that take it)."""
        return calib_batches

    def describe(self) -> dict[str, Any]:
        """The method as report.json records it."""
        return {"criterion": self.name, "eta": None}

    @property
    def history(self) -> list[dict[str, Any]]:
        """pruning_history.json of the last call: one record per pruning event (none for one-step
        pruners)."""
        return []

    @abstractmethod
    def __call__(self, model: nn.Module, latency_model: LatencyModel | None, batches: Sequence[Sequence[Tensor]],
                 device: str | torch.device = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None
                 ) -> dict[float, nn.Module]:
        """A pruned copy of `model` per target from calibration `batches` of (images, labels);
        `model` is left untouched. `checkpoint`: see `saves_progress`."""


def batches_for_samples(samples: int, batch_size: int) -> int:
    """Calibration batches that hold `samples` images (at least one batch)."""
    return max(1, math.ceil(samples / batch_size))
