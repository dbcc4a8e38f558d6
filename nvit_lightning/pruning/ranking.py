"""NViT's global ranking as a pruner (`pruner=oneshot | hessian | taylor | magnitude | random`):
saliency of every structural group of every kind in one ranking, minus η·ΔLat, pruned in events.

In one shot (prune.py) the saliency comes from calibration batches and is re-measured on the pruned
model before each later event; while training (train.py, `gradual`) the Lightning callback
`callbacks.GlobalPruning` feeds it from the fine-tuning steps every `interval` steps.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..latency.models import LatencyModel
from ..models import KINDS, PrunableViT
from .base import Pruner
from .criteria import CRITERIA, Criterion
from .groups import Structure
from .interrupt import Checkpoint
from .pruner import GlobalPruner, PruningEvent, build_pruning, check_ranking_options, event_record, prune_to_targets

log = logging.getLogger("nvit_lightning")


class GlobalRanking(Pruner):
    """criterion: hessian (NViT) | taylor | magnitude | random. ranking: `penalty` = saliency − η·ΔLat
    (η relative to the mean group saliency per mean group ΔLat) | `per_latency` = saliency per ms.
    target / snapshots: latency ratios to stop at / to snapshot on the way. An event removes up to
    `groups_per_event` groups, or `latency_step` of the dense latency; `interval`: optimizer steps
    between events while training. `rescore`: re-measure saliency before each later one-shot event,
    on the first `rescore_batches` calibration batches. The other options go to the criterion."""

    gradual = True

    def __init__(self, criterion: str = "hessian", ranking: str = "penalty", eta: float = 0.0,
                 target: float = 0.7, snapshots: Sequence[float] = (), interval: int = 100,
                 groups_per_event: int = 8, latency_step: float | None = None, kinds: Sequence[str] = KINDS,
                 group_sizes: Mapping[str, int] | None = None, divisors: Mapping[str, float] | None = None,
                 ema_beta: float = 0.9, seed: int = 0, rescore: bool = True, rescore_batches: int = 4) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown pruner.criterion '{criterion}'; choose one of {sorted(CRITERIA)}")
        self.target = float(target)
        self.targets = sorted({self.target, *map(float, snapshots)}, reverse=True)
        check_ranking_options(float(eta), int(groups_per_event), self.targets, ranking, latency_step, kinds)
        if any(float(t) <= self.target for t in snapshots):
            raise ValueError(f"pruner.snapshots {list(snapshots)} must all be above pruner.target {target}")
        if float(ema_beta) < 0:
            raise ValueError(f"pruner.ema_beta must be >= 0, got {ema_beta}")
        for key, value in (("interval", interval), ("rescore_batches", rescore_batches)):
            if int(value) < 1:
                raise ValueError(f"pruner.{key} must be >= 1, got {value}")
        self.name = self.criterion = criterion
        self.ranking, self.eta, self.latency_step = ranking, float(eta), latency_step
        self.interval, self.groups_per_event = int(interval), int(groups_per_event)
        self.kinds, self.group_sizes = list(kinds), dict(group_sizes or {})
        self.criterion_options = {"divisors": dict(divisors or {}), "ema_beta": float(ema_beta), "seed": int(seed)}
        self.rescore, self.rescore_batches = bool(rescore), int(rescore_batches)
        self._history: list[dict[str, Any]] = []

    def build(self, model: PrunableViT, latency_model: LatencyModel) -> tuple[Structure, Criterion, GlobalPruner]:
        """Structure, criterion and global pruner over the masked `model`."""
        return build_pruning(model, latency_model, criterion=self.criterion, eta=self.eta, targets=self.targets,
                             groups_per_event=self.groups_per_event, group_sizes=self.group_sizes,
                             ranking=self.ranking, latency_step=self.latency_step, kinds=self.kinds,
                             **self.criterion_options)

    def check(self, model: PrunableViT, latency_model: LatencyModel) -> None:
        if not model.masked:
            raise ValueError("the global ranking prunes a masked PrunableViT: call model.with_masks() first")
        self.build(model, latency_model)  # bad group sizes, an unreachable target

    def describe(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "eta": self.eta}

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._history

    def __call__(self, model: PrunableViT, latency_model: LatencyModel, batches: Sequence[Sequence[Tensor]],
                 device: str | torch.device = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None
                 ) -> dict[float, PrunableViT]:
        model = copy.deepcopy(model)
        _, criterion, pruner = self.build(model, latency_model)
        pruned: dict[float, PrunableViT] = {}
        self._history = []

        def on_event(event: PruningEvent) -> None:
            log.info(event.summary())
            self._history.append(event_record(event, model))
            for target in event.targets_reached:
                pruned[target] = copy.deepcopy(model)

        prune_to_targets(pruner, criterion, calibrator(model, batches, criterion, device, progress), self.rescore,
                         on_event, calibrator(model, batches[:self.rescore_batches], criterion, device, progress))
        return pruned


def calibrator(model: PrunableViT, batches: Sequence[Sequence[Tensor]], criterion: Criterion,
               device: str | torch.device = "cpu", progress: bool = True) -> Callable[[], None]:
    """A `calibrate()` for `prune_to_targets`: forward/backward over the batches, feeding the
    criterion after each backward."""

    def calibrate() -> None:
        model.to(device).eval()  # no dropout: saliency of the function that is actually pruned
        for images, labels in tqdm(batches, desc="saliency", leave=False, disable=not progress):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images.to(device)), labels.to(device)).backward()
            criterion.accumulate()
        model.zero_grad(set_to_none=True)

    return calibrate
