"""Learning-rate schedules as `LambdaLR`s that know the run's length (`total_steps`)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """NViT's pruning stage: constant lr (after an optional linear warm-up)."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.01) -> LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr_ratio` x the base lr at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def cyclic_linear(optimizer: Optimizer, total_steps: int, cycle_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """oViT's sparsity sweep: every `cycle_steps` steps the lr restarts at the base lr and falls
    linearly to `min_lr_ratio` x it by the end of the cycle."""
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be >= 1, got {cycle_steps}")

    def factor(step: int) -> float:
        return 1.0 - (1.0 - min_lr_ratio) * (step % cycle_steps) / cycle_steps

    return LambdaLR(optimizer, factor)
