"""Latency-constrained structured pruning in one shot (ZipLM-style): per-block widths chosen by a
dynamic program over the structured-OBS removal traces, under a latency-model budget.

For every block and every (heads removed, MLP neurons removed) pair, the estimated loss is the sum of
the two layers' trace costs (`structured_obs`) and the latency is the latency model's prediction for
that block. A knapsack over the blocks picks one pair per block with the least total cost whose
predicted latency meets the target; one set of traces serves every target, so a family of speed-ups
comes from one pass over the calibration images. Which heads / neurons go is the traces' order.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models import PrunableViT, ViTDims
from .base import Pruner
from .groups import Structure
from .latency import LatencyModel
from .pruner import UnreachableTargetError
from .structured_obs import ROW_WEIGHTS, RemovalTrace, collect_statistics, removal_trace

log = logging.getLogger("nvit_lightning")

SEARCH_KINDS = ("head", "mlp")


@dataclass
class BlockOptions:
    """The widths one block may take: `removed[j] = (heads, neurons)` with estimated loss `cost[j]`
    and predicted block latency `latency[j]` (ms)."""

    removed: list[tuple[int, int]]
    cost: Tensor  # (n,) float64
    latency: Tensor  # (n,) float64


def cheapest_under_budget(blocks: Sequence[BlockOptions], budget: float, bins: int = 4000) -> list[int]:
    """One option per block, least total cost with total latency <= `budget` (ms): a dynamic program
    over latency discretised into `bins` steps, each option's latency rounded *up*, so the chosen
    widths never exceed the budget."""
    lowest = sum(float(b.latency.min()) for b in blocks)
    if lowest > budget:
        raise UnreachableTargetError(f"the smallest allowed widths need {lowest:.2f} ms of block latency, "
                                     f"over the budget of {budget:.2f} ms")
    step = budget / bins
    best = torch.full((bins + 1,), math.inf, dtype=torch.float64)  # least cost at exactly this many steps
    best[0] = 0.0
    choices = []
    for block in blocks:
        steps = torch.ceil(block.latency / step - 1e-9).long().tolist()
        new = torch.full_like(best, math.inf)
        choice = torch.full((bins + 1,), -1, dtype=torch.long)
        for j, (s, c) in enumerate(zip(steps, block.cost.tolist())):
            if s > bins:
                continue
            candidate = torch.full_like(best, math.inf)
            candidate[s:] = best[: bins + 1 - s] + c
            better = candidate < new
            new[better], choice[better] = candidate[better], j
        best = new
        choices.append(choice)
    if not torch.isfinite(best).any():  # only by rounding: the budget is within one step of the floor
        raise UnreachableTargetError(f"no widths fit the budget of {budget:.2f} ms at this resolution")
    at, picks = int(best.argmin()), []
    for block, choice in zip(reversed(blocks), reversed(choices)):
        j = int(choice[at])
        picks.append(j)
        at -= int(torch.ceil(block.latency[j] / step - 1e-9))
    return picks[::-1]


def _kept_widths(n: int, group_size: int) -> list[int]:
    """Widths a layer of n live units may keep: all of them, or whole groups (at least one)."""
    return [n, *range(group_size * ((n - 1) // group_size), 0, -group_size)]


class LatencySearch(Pruner):
    """Prune a masked PrunableViT to latency targets in one shot: structured-OBS traces of heads and
    MLP neurons on calibration images, then the per-block widths of least estimated loss within each
    target (`cheapest_under_budget`). Weight compensation is left to the reconstruction that follows
    (`conf/reconstruction/`), which refits the same layers to the dense model.

    target / snapshots: latency ratios (of the dense predicted latency) to produce models for.
    group_sizes: heads and MLP neurons removed together (kept widths are multiples of them).
    damping: ridge of the OBS inverse, relative to the mean input energy.
    row_weights: `fisher` weighs each output channel by the loss gradient's energy (traces comparable
    across layers); `uniform` treats every residual channel alike.
    """

    name = "obs_search"

    def __init__(self, target: float = 0.7, snapshots: Sequence[float] = (),
                 group_sizes: Mapping[str, int] | None = None, damping: float = 0.01,
                 row_weights: str = "fisher", bins: int = 4000) -> None:
        self.targets = sorted({float(t) for t in (target, *snapshots)}, reverse=True)
        if any(not 0.0 < t < 1.0 for t in self.targets):
            raise ValueError(f"latency targets must lie strictly between 0 and 1, got {self.targets}")
        self.target = float(target)
        sizes = {"head": 1, "mlp": 16, **(group_sizes or {})}
        unknown = set(sizes) - set(SEARCH_KINDS)
        if unknown:
            raise ValueError(f"the latency search prunes {SEARCH_KINDS} only; unknown group sizes {sorted(unknown)}")
        if any(int(v) < 1 for v in sizes.values()):
            raise ValueError(f"group sizes must be >= 1, got {sizes}")
        self.group_sizes = {k: int(v) for k, v in sizes.items()}
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if row_weights not in ROW_WEIGHTS:
            raise ValueError(f"row_weights must be one of {ROW_WEIGHTS}, got {row_weights!r}")
        if bins < 10:
            raise ValueError(f"bins must be >= 10, got {bins}")
        self.damping, self.row_weights, self.bins = float(damping), row_weights, int(bins)

    # ---- traces ----------------------------------------------------------------------------------------
    def traces(self, model: PrunableViT, batches: Sequence[Sequence[Tensor]], device: str | torch.device = "cpu",
               progress: bool = True) -> list[dict[str, tuple[Tensor, RemovalTrace]]]:
        """Per block: kind -> (live unit indices, their removal trace), from calibration `batches`."""
        stats = collect_statistics(copy.deepcopy(model), batches, device,
                                   gradients=self.row_weights == "fisher", progress=progress)
        out = []
        # minutes for wide MLPs (ViT-B: 3072 neurons per block on 2 CPU cores): show the blocks done
        for i, block in enumerate(tqdm(model.blocks, desc="removal traces", disable=not progress, leave=False)):
            a, mlp = block.attn, block.mlp
            heads = a.head_mask.nonzero().flatten()
            v_cols = a.v_mask.nonzero().flatten()
            head_units = [h * a.v_dim + v_cols for h in heads.tolist()]
            neurons = mlp.mask.nonzero().flatten()
            out.append({
                "head": (heads, removal_trace(a.proj.weight, a.proj.bias, stats[f"blocks.{i}.attn.proj"],
                                              head_units, 1, self.damping, self.row_weights)),
                "mlp": (neurons, removal_trace(mlp.fc2.weight, mlp.fc2.bias, stats[f"blocks.{i}.mlp.fc2"],
                                               list(neurons[:, None]), 1, self.damping, self.row_weights)),
            })
        return out

    def options(self, model: PrunableViT, latency_model: LatencyModel,
                traces: Sequence[Mapping[str, tuple[Tensor, RemovalTrace]]]) -> list[BlockOptions]:
        """Every block's allowed (heads, neurons) removals with their trace cost and block latency."""
        dims = model.live_dims()
        blocks = []
        for i, trace in enumerate(traces):
            n_heads, n_mlp = len(trace["head"][0]), len(trace["mlp"][0])
            removed = [(n_heads - kept_heads, n_mlp - kept_mlp)
                       for kept_heads in _kept_widths(n_heads, self.group_sizes["head"])
                       for kept_mlp in _kept_widths(n_mlp, self.group_sizes["mlp"])]
            rows = torch.tensor([[dims.emb, n_heads - h, dims.qk[i], dims.v[i], n_mlp - m] for h, m in removed],
                                dtype=torch.float64)
            cost = torch.tensor([float(trace["head"][1].cost[h] + trace["mlp"][1].cost[m]) for h, m in removed],
                                dtype=torch.float64)
            blocks.append(BlockOptions(removed, cost, latency_model.block_latency(rows).double()))
        return blocks

    # ---- pruning ---------------------------------------------------------------------------------------
    def check(self, model: PrunableViT, latency_model: LatencyModel) -> None:
        """Refuse a model the search cannot prune, or a target below the latency that the fewest
        heads and MLP neurons leave (the floor): callers run it before any other work."""
        if not model.masked:
            raise ValueError("the latency search prunes a masked PrunableViT: call model.with_masks() first")
        dims = model.live_dims()
        smallest = ViTDims(dims.emb, [min(h, self.group_sizes["head"]) for h in dims.heads], dims.qk, dims.v,
                           [min(m, self.group_sizes["mlp"]) for m in dims.mlp])
        floor = latency_model.model_latency(smallest) / latency_model.model_latency(dims)
        if min(self.targets) < floor:
            raise UnreachableTargetError(
                f"latency target {min(self.targets)} is unreachable: removing heads and MLP neurons alone "
                f"(group sizes {self.group_sizes}) leaves at least {floor:.3f} of the dense latency "
                f"(pruner.target >= {floor:.3f}, or a smaller pruner.group_sizes)")

    def __call__(self, model: PrunableViT, latency_model: LatencyModel, batches: Sequence[Sequence[Tensor]],
                 device: str | torch.device = "cpu", progress: bool = True) -> dict[float, PrunableViT]:
        """A pruned (masked, not refit) copy of `model` per target, from calibration `batches` of
        (images, labels); `model` is left untouched."""
        self.check(model, latency_model)  # before any statistics are collected
        dims = model.live_dims()
        dense_latency = latency_model.model_latency(dims)
        traces = self.traces(model, batches, device, progress)
        blocks = self.options(model, latency_model, traces)
        base = latency_model.base_latency(dims.emb)
        pruned = {}
        for target in self.targets:
            picks = cheapest_under_budget(blocks, target * dense_latency - base, self.bins)
            pruned_model = copy.deepcopy(model)
            groups = []
            for i, (block, j) in enumerate(zip(blocks, picks)):
                for kind, count in zip(SEARCH_KINDS, block.removed[j]):
                    units, trace = traces[i][kind]
                    if count:
                        groups.append(((kind, i), units[trace.order[:count]]))
            Structure(pruned_model, {"head": 1, "mlp": 1}).prune(groups)
            pruned[target] = pruned_model
            kept = pruned_model.live_dims()
            log.info(f"target {target}: {latency_model.model_latency(kept) / dense_latency:.3f} of the dense "
                     f"predicted latency; heads {list(kept.heads)}, mlp {list(kept.mlp)}")
        return pruned
