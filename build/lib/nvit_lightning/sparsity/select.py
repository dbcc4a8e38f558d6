"""How many weights each block loses: one global threshold on the OBS losses, or the same sparsity
in every layer (with a threshold inside the layer)."""

from __future__ import annotations

import torch
from torch import Tensor

DISTRIBUTIONS = ("global", "uniform")


def _monotone(losses: Tensor, forced: Tensor) -> Tensor:
    """Each block's removal losses made non-decreasing along its order (a later removal is never
    taken before an earlier one), with the `forced` leading removals at -inf (always taken)."""
    losses = losses.cummax(dim=1).values.clone()
    steps = torch.arange(losses.shape[1], device=losses.device)
    return losses.masked_fill(steps[None, :] < forced[:, None], float("-inf"))


def _cheapest(losses: list[Tensor], forced: list[Tensor], extra: int) -> list[Tensor]:
    """Counts per block of the `sum(forced) + extra` cheapest removals over all `losses`."""
    flat = torch.cat([_monotone(loss, f).reshape(-1) for loss, f in zip(losses, forced)])
    take = min(int(sum(int(f.sum()) for f in forced)) + max(extra, 0), flat.numel())
    chosen = torch.zeros_like(flat, dtype=torch.long)
    chosen[torch.topk(flat, take, largest=False, sorted=False).indices] = 1
    counts, start = [], 0
    for loss in losses:
        counts.append(chosen[start:start + loss.numel()].view_as(loss).sum(1))
        start += loss.numel()
    return counts


def removal_counts(losses: dict[str, Tensor], forced: dict[str, Tensor], numels: dict[str, int],
                   zeros: dict[str, int], sparsity: float, distribution: str = "global") -> dict[str, Tensor]:
    """Per layer, the number of leading removals of each block's order so that `sparsity` of all
    weights are zero: over all layers at once (`global`) or in each layer (`uniform`).

    `forced[name]` counts each block's leading removals that are free (padding and weights already
    pruned), `zeros[name]` the real weights among them; `numels[name]` the layer's real weights."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown sparsity distribution '{distribution}': use one of {DISTRIBUTIONS}")
    names = list(losses)
    if distribution == "global":
        extra = round(sparsity * sum(numels.values())) - sum(zeros.values())
        return dict(zip(names, _cheapest([losses[n] for n in names], [forced[n] for n in names], extra)))
    return {n: _cheapest([losses[n]], [forced[n]], round(sparsity * numels[n]) - zeros[n])[0] for n in names}
