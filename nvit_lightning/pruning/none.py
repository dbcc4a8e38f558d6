"""`pruner=none`: no pruning, so train.py only fine-tunes (stage 2), e.g. a compact model on new data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models import PrunableViT


class NoPruning:
    """The pruner that keeps every structure: `NoPruning()(model)` is `model`, unchanged.

    train.py then runs stage 2 alone on the given model (dense or compact: `model=from_dir`) for
    `schedule.finetune_epochs` epochs with the configured distillation, evaluates it and writes model/
    and report.json like every other run; its latency target is 1.0, all of the model's latency.
    """

    name = "none"

    def __init__(self, target: float = 1.0) -> None:
        if float(target) != 1.0:
            raise ValueError(f"pruner=none keeps the whole model, so its latency target is 1.0 (got "
                             f"pruner.target={target}): pick a pruner, e.g. pruner=obs_search, to prune")
        self.target = 1.0

    def __call__(self, model: PrunableViT) -> PrunableViT:
        return model


def check_teacher(model_cfg: Mapping[str, Any], kl_weight: float) -> None:
    """With pruner=none the distillation teacher is the starting model: refuse KL (`kl_weight > 0`) to
    it when `model.num_classes` gives a loaded model a new, untrained head (its logits mean nothing)."""
    new_head = model_cfg.get("num_classes") is not None and model_cfg.get("dims") is None
    if kl_weight > 0 and new_head:
        raise ValueError(f"pruner=none distils to the starting model, but model.num_classes="
                         f"{model_cfg.get('num_classes')} gives it a new, untrained head: add distill=none "
                         f"(or keep the trained head: model.num_classes=null)")
