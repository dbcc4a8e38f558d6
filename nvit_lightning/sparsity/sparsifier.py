"""Sparsifiers: oViT / WoodFisher (second order) and global magnitude, unstructured or N:M.

A sparsifier is a pruner (`pruning.Pruner`, "sparse" output) whose targets are sparsity levels: it
maps a model and calibration batches to one sparse copy of the model per level, zeros in place
(`{sparsity: model}`); the copies share nothing with the input model. Latency plays no part.
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..pruning.base import Pruner, batches_for_samples
from ..pruning.interrupt import Checkpoint
from .fisher import block_fisher, damped_inverse
from .layers import Blocks, layer_sparsity, sparsifiable_layers
from .obs import ORDERS, obs_order, obs_prune
from .select import DISTRIBUTIONS, removal_counts

log = logging.getLogger("nvit_lightning")
Batches = Iterable[tuple[Tensor, Tensor]]


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None, 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern must be 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {pattern!r}")
    return n, m


class Sparsifier(Pruner):
    """The options every sparsifier shares: levels, pattern, distribution and which layers."""

    output = "sparse"

    def __init__(self, sparsities: Sequence[float] | None = (0.5, 0.6, 0.7, 0.8), pattern: str = "unstructured",
                 distribution: str = "global", patch_embed: bool = False, head: bool = False) -> None:
        self.nm = parse_pattern(pattern)
        self.pattern = str(pattern)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"pruner.distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if self.nm is not None:
            n, m = self.nm
            if sparsities and [float(s) for s in sparsities] != [(m - n) / m]:
                raise ValueError(f"{pattern} sparsity is {(m - n) / m:g} by definition: set pruner.sparsities=null")
            sparsities = [(m - n) / m]
        if not sparsities:
            raise ValueError("pruner.sparsities is empty: give the sparsity levels to reach, e.g. [0.5, 0.6]")
        for s in sparsities:
            if not isinstance(s, int | float) or not 0.0 < float(s) < 1.0:
                raise ValueError(f"sparsities must lie strictly between 0 and 1, got {s!r}")
        self.sparsities = sorted(float(s) for s in sparsities)
        self.targets = self.sparsities
        self.distribution, self.patch_embed, self.head = distribution, patch_embed, head

    def describe(self) -> dict[str, Any]:
        return {"criterion": self.name, "pattern": self.pattern, "distribution": self.distribution}

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = sparsifiable_layers(model, self.patch_embed, self.head)
        if self.nm is not None:
            m = self.nm[1]
            bad = [name for name, layer in layers.items() if layer.weight[0].numel() % m]
            if bad:
                raise ValueError(f"{self.pattern} sparsity needs input widths divisible by {m}; {bad[:3]} are not")
        return layers

    @abstractmethod
    def __call__(self, model: nn.Module, latency_model: Any = None, batches: Batches = (),
                 device: str | torch.device = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None
                 ) -> dict[float, nn.Module]:
        """One sparse copy of `model` per level of `self.sparsities`."""

    @staticmethod
    def _copies(model: nn.Module, weights: dict[float, dict[str, Tensor]]) -> dict[float, nn.Module]:
        out = {}
        for level, new in weights.items():
            sparse = copy.deepcopy(model)
            modules = dict(sparse.named_modules())
            with torch.no_grad():
                for name, w in new.items():
                    modules[name].weight.copy_(w)
            out[level] = sparse
        return out


class MagnitudeSparsifier(Sparsifier):
    """Zero the smallest |w|: over all layers at once (global), per layer (uniform), or the
    smallest m − n of every m consecutive input weights (N:M). No data, no compensation."""

    name = "global magnitude"

    def calibration_batches(self, calib_batches: int, batch_size: int) -> int:
        return 0  # no data

    def __call__(self, model: nn.Module, latency_model: Any = None, batches: Batches = (),
                 device: str | torch.device = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None
                 ) -> dict[float, nn.Module]:
        layers = self.layers(model)
        weights = {name: layer.weight.detach() for name, layer in layers.items()}
        out: dict[float, dict[str, Tensor]] = {}
        for level in self.sparsities:
            if self.nm is not None:
                n, m = self.nm
                out[level] = {name: _nm_magnitude(w, n, m) for name, w in weights.items()}
                continue
            groups = [list(weights)] if self.distribution == "global" else [[name] for name in weights]
            out[level] = {}
            for names in groups:
                flat = torch.cat([weights[name].abs().reshape(-1) for name in names])
                keep = torch.ones_like(flat, dtype=torch.bool)
                keep[torch.topk(flat, round(level * flat.numel()), largest=False, sorted=False).indices] = False
                start = 0
                for name in names:
                    w = weights[name]
                    out[level][name] = w * keep[start:start + w.numel()].view_as(w)
                    start += w.numel()
        return self._copies(model, out)


def _nm_magnitude(w: Tensor, n: int, m: int) -> Tensor:
    groups = w.reshape(-1, m)
    drop = groups.abs().topk(m - n, dim=1, largest=False).indices
    return groups.scatter(1, drop, 0.0).view_as(w)


class OBSSparsifier(Sparsifier):
    """oViT (`order=greedy`) or WoodFisher (`order=static`): Optimal Brain Surgeon on the empirical
    Fisher of blocks of `block_size` weights from `num_grads` per-sample gradients.

    Fisher blocks take rows x B² x 4 bytes per layer (DeiT-Tiny, B = 64: 1.4 GB in all); layers are
    processed in chunks whose Fisher fits `fisher_budget_gb`. With more than one chunk the gradients
    are collected twice per chunk (once to rank, once to update) rather than keeping every chunk.

    `steps` = k > 1 reaches the highest level s in k steps (multi-step / iterative OBS): the Fisher is
    computed again on the sparse model at s/k, 2s/k, ..., (k−1)s/k (k equal steps from the model's
    own sparsity, 0 for a dense model), whose zeros stay zero (they are the first, free removals of
    the next step); each level is cut from the last Fisher below it, starting from the model there.
    The levels then nest (every zero of a level is a zero of the higher ones). `steps=1`: one Fisher
    at the model's weights for every level (held-out top-1 of DeiT-Tiny at 60 / 70 / 80 %, oViT alone:
    59.2 / 32.9 / 3.1 % with 1 step, 61.2 / 39.8 / 11.2 % with 4; docs/sparsity_reconstruction.md)."""

    def __init__(self, sparsities: Sequence[float] | None = (0.5, 0.6, 0.7, 0.8), pattern: str = "unstructured",
                 distribution: str = "global", patch_embed: bool = False, head: bool = False,
                 order: str = "greedy", block_size: int = 64, num_grads: int = 1024, damp: float = 1e-4,
                 fisher_budget_gb: float = 8.0, device: str = "cpu", steps: int = 1) -> None:
        super().__init__(sparsities, pattern, distribution, patch_embed, head)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"pruner.steps must be an integer >= 1 (1: one Fisher at the dense weights for every "
                             f"level), got {steps!r}")
        if order not in ORDERS:
            raise ValueError(f"pruner.order must be one of {ORDERS}, got {order!r}")
        if block_size < 1 or num_grads < 1 or damp <= 0 or fisher_budget_gb <= 0:
            raise ValueError(f"need block_size >= 1, num_grads >= 1, damp > 0 and fisher_budget_gb > 0, got "
                             f"{block_size}, {num_grads}, {damp}, {fisher_budget_gb}")
        if self.nm is not None and block_size % self.nm[1]:
            raise ValueError(f"block_size {block_size} must be a multiple of M = {self.nm[1]} for {pattern}")
        self.order, self.block_size, self.num_grads, self.damp = order, block_size, num_grads, damp
        self.fisher_budget_gb, self.device, self.steps = fisher_budget_gb, device, steps

    @property
    def name(self) -> str:
        return "oViT" if self.order == "greedy" else "WoodFisher"

    def chunks(self, layers: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
        """Consecutive layers grouped so that each group's Fisher and its inverse fit the budget."""
        budget = self.fisher_budget_gb * 2**30
        chunks: list[dict[str, nn.Module]] = [{}]
        used = 0.0
        for name, layer in layers.items():
            need = 2 * Blocks(layer.weight.numel(), self.block_size).rows * self.block_size**2 * 4
            if need > budget:
                raise ValueError(f"the Fisher of {name} needs {need / 2**30:.2f} GiB, over fisher_budget_gb="
                                 f"{self.fisher_budget_gb}: raise it or lower pruner.block_size")
            if chunks[-1] and used + need > budget:
                chunks.append({})
                used = 0.0
            chunks[-1][name] = layer
            used += need
        return chunks

    def _inverses(self, model: nn.Module, chunk: dict[str, nn.Module], batches: Batches) -> dict[str, Tensor]:
        fisher = block_fisher(model, chunk, batches, self.num_grads, self.block_size, self.device)
        return {name: damped_inverse(fisher.pop(name), self.damp) for name in list(fisher)}

    def calibration_batches(self, calib_batches: int, batch_size: int) -> int:
        """`num_grads` images of the calibration subset, the same on every pass (a Fisher in chunks
        reads them twice)."""
        return batches_for_samples(self.num_grads, batch_size)

    def __call__(self, model: nn.Module, latency_model: Any = None, batches: Batches = (),
                 device: str | torch.device = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None
                 ) -> dict[float, nn.Module]:
        """`device` is the run's; the Fisher blocks go where `self.device` says (they can outgrow a GPU)."""
        model = model.to(self.device)
        if self.steps == 1:
            return self._copies(model, self._prune(model, batches, self.sparsities))
        out: dict[float, nn.Module] = {}
        current = model
        zeros, _ = layer_sparsity(model, list(self.layers(model)))
        for start, stop, levels in self.schedule(zeros):
            cut = sorted({*levels, stop})
            log.info(f"oViT step {start:.3f} -> {stop:.3f}: Fisher of the {start:.0%} sparse model, levels "
                     f"{[round(s, 4) for s in levels]}")
            models = self._copies(current, self._prune(current, batches, cut, final=self.sparsities[-1]))
            out.update({level: models[level] for level in levels})
            current = models[stop]
        return out

    def grid(self, start: float = 0.0) -> list[float]:
        """The sparsities the steps start from and end at: k equal steps from the model's own sparsity
        `start` (0 for a dense model) to the highest level s: 0, s/k, ..., s."""
        top, k = self.sparsities[-1], self.steps
        if start >= top:
            return [start, top]
        return [round(start + (top - start) * i / k, 12) for i in range(k)] + [top]

    def schedule(self, start: float = 0.0) -> list[tuple[float, float, list[float]]]:
        """The steps (from, to, levels cut there); a level is cut in the step whose span (from, to]
        holds it (a level at or below `start` in the first), from the Fisher at `from`."""
        grid = self.grid(start)
        return [(lo, hi, [s for s in self.sparsities if lo < s <= hi or (i == 0 and s <= lo)])
                for i, (lo, hi) in enumerate(pairwise(grid))]

    def _prune(self, model: nn.Module, batches: Batches, levels: list[float], final: float | None = None
               ) -> dict[float, dict[str, Tensor]]:
        """The sparse weights of each of `levels` from one Fisher at `model`'s weights (its zeros kept).
        N:M: a level below `final` (an intermediate step) takes that fraction of each block's removals."""
        layers = self.layers(model)
        chunks = self.chunks(layers)
        if len(chunks) > 1:
            log.info(f"Fisher in {len(chunks)} chunks of layers (fisher_budget_gb={self.fisher_budget_gb})")
        blocks = {name: Blocks(layer.weight.numel(), self.block_size) for name, layer in layers.items()}
        views = {name: blocks[name].view(layer.weight) for name, layer in layers.items()}
        first = {name: blocks[name].padding_mask(self.device) | (views[name] == 0) for name in layers}
        steps = self.block_size if self.nm is None else self.block_size * (self.nm[1] - self.nm[0]) // self.nm[1]
        orders, losses, kept = {}, {}, {}
        for chunk in chunks:
            finv = self._inverses(model, chunk, batches)
            for name in tqdm(chunk, desc="OBS order", leave=False):
                orders[name], losses[name] = obs_order(views[name], finv[name], self.order, steps, first[name],
                                                       self.nm)
            if len(chunks) == 1:  # the update pass reuses these; with several chunks it collects them again
                kept = finv
        counts = self._counts(layers, blocks, first, losses, levels, final)
        weights: dict[float, dict[str, Tensor]] = {level: {} for level in levels}
        for chunk in chunks:
            finv = kept or self._inverses(model, chunk, batches)
            for name, layer in tqdm(chunk.items(), desc="OBS updates", leave=False):
                pruned = obs_prune(views[name], finv.pop(name), orders[name], [counts[s][name] for s in levels])
                for level, w in zip(levels, pruned):
                    weights[level][name] = blocks[name].unview(w, layer.weight)
        return weights

    def _counts(self, layers: dict[str, nn.Module], blocks: dict[str, Blocks], first: dict[str, Tensor],
                losses: dict[str, Tensor], levels: list[float], final: float | None = None
                ) -> dict[float, dict[str, Tensor]]:
        if self.nm is not None:  # every block takes all its m - n removals per group of m (a share of them
            final = final or levels[-1]  # in an intermediate step)
            return {level: {name: torch.full((blocks[name].rows,), round(loss.shape[1] * level / final),
                                             device=loss.device) for name, loss in losses.items()}
                    for level in levels}
        forced = {name: f.sum(1) for name, f in first.items()}
        zeros = {name: int(f.sum()) - blocks[name].pad for name, f in first.items()}
        numels = {name: layer.weight.numel() for name, layer in layers.items()}
        return {level: removal_counts(losses, forced, numels, zeros, level, self.distribution) for level in levels}
