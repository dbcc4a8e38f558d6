"""The global pruner: one ranking of all groups of all kinds, penalised by their latency.

score(S) = Σ_{u∈S} i_u − η · (Lat(W) − Lat(W∖S)), with S a group of `group_size` units of one layer.
Within a layer the units are sorted by importance and chunked into groups (the penalty is the same
for every group of a layer, so chunking the sorted units gives the cheapest groups first); all groups
are ranked together and the lowest go, until `groups_per_event` are gone or the next latency target
is crossed. Lat(W∖S) is the exact latency-model difference for removing one group from the current
architecture; further groups of the same layer in the same event reuse it (an event removes a few
groups out of thousands, so the slope barely moves).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..latency.models import LatencyModel, block_rows, dims_from_block_rows
from ..models import EMB, KIND_SPECS, KINDS, LayerKey, PrunableViT, ViTDims
from .criteria import Criterion, build_criterion
from .groups import Structure

# columns of a latency-model row (ViTDims.block): the kinds in their declared order (models/structure.py)
_KIND_COLUMN = {kind: column for column, kind in enumerate(KINDS)}


# how groups are ordered: "penalty" = NViT's saliency − η·ΔLat (η dimensionless: relative to the mean
# group saliency per mean group latency saving, so one η means the same on every model and device);
# "per_latency" = saliency per ms of predicted latency saved (groups that save none are never pruned)
RANKINGS = ("penalty", "per_latency")


class UnreachableTargetError(ValueError):
    """The latency target is below what the group-size constraints allow."""


@dataclass
class PruningEvent:
    index: int
    pruned: dict[str, int]  # units removed per kind
    latency_before: float  # ms, latency model
    latency_after: float
    ratio_after: float  # latency_after / dense latency
    dims: ViTDims
    targets_reached: list[float] = field(default_factory=list)

    def summary(self) -> str:
        removed = ", ".join(f"{k} {n}" for k, n in self.pruned.items() if n)
        return (f"event {self.index}: removed {removed or 'nothing'}; latency {self.latency_before:.2f} -> "
                f"{self.latency_after:.2f} ms ({self.ratio_after:.3f} of dense)")


def event_record(event: PruningEvent, model: PrunableViT, step: int | None = None) -> dict[str, Any]:
    """One entry of pruning_history.json, the same for every pipeline that prunes in events: the
    latency and size after the event, the units it removed per kind, and the dims. `step` is the
    optimizer step of pruning while training; one-shot events have none."""
    size = model.size_of(event.dims)
    return {"event": event.index, **({"step": step} if step is not None else {}), "latency_ms": event.latency_after,
            "latency_ratio": event.ratio_after, "params": size["params"], "macs": size["macs"],
            **{f"pruned_{k}": n for k, n in event.pruned.items()}, "dims": event.dims.to_dict()}


@dataclass
class RankedGroups:
    """Every prunable group, lowest penalised score first. Groups are rows of per-layer chunk tables
    (no tensor per group: DeiT-B has thousands, and only the few lowest are ever pruned)."""

    scores: Tensor  # (n,) penalised group scores, ascending
    layer_index: Tensor  # (n,) index into `keys` / `chunks`
    row: Tensor  # (n,) row of that layer's chunk table
    keys: list[LayerKey]
    chunks: list[Tensor]  # per layer: (allowed groups, group_size) unit indices, cheapest first

    def top(self, n: int | None = None) -> list[tuple[LayerKey, Tensor]]:
        """(layer, unit indices) of the n lowest-scored groups (all by default)."""
        pairs = zip(self.layer_index[:n].tolist(), self.row[:n].tolist())
        return [(self.keys[layer], self.chunks[layer][row]) for layer, row in pairs]


def check_ranking_options(eta: float, groups_per_event: int, targets: Sequence[float], ranking: str,
                          latency_step: float | None, kinds: Sequence[str]) -> None:
    """The global ranking's options, checked where it is configured (`ranking.GlobalRanking`, before
    any model is loaded) and where it is built (`GlobalPruner`)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
    if latency_step is not None and not 0.0 < latency_step < 1.0:
        raise ValueError(f"latency_step must lie strictly between 0 and 1 (a fraction of the dense "
                         f"latency per event), got {latency_step}")
    if set(kinds) - set(KINDS) or not kinds:
        raise ValueError(f"pruner.kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if groups_per_event < 1:
        raise ValueError(f"groups_per_event must be >= 1, got {groups_per_event}")
    targets = [float(t) for t in targets]
    if not targets or any(not 0.0 < t < 1.0 for t in targets):
        raise ValueError(f"latency targets must lie strictly between 0 and 1, got {targets}")


class GlobalPruner:
    def __init__(self, structure: Structure, latency_model: LatencyModel, eta: float = 0.0,
                 groups_per_event: int = 8, targets: Sequence[float] = (0.7,),
                 dense_latency: float | None = None, ranking: str = "penalty",
                 latency_step: float | None = None, kinds: Sequence[str] = KINDS) -> None:
        check_ranking_options(eta, groups_per_event, targets, ranking, latency_step, kinds)
        self.ranking, self.latency_step = ranking, latency_step
        self.kinds = tuple(k for k in KINDS if k in kinds)
        targets = [float(t) for t in targets]
        self.structure, self.latency_model = structure, latency_model
        self.eta, self.groups_per_event = float(eta), int(groups_per_event)
        self.targets = sorted(set(targets), reverse=True)
        self.dense_latency = dense_latency or latency_model.model_latency(structure.live_dims())
        self.reached: list[float] = []
        self.events = 0

    # ---- where we are ----------------------------------------------------------------------------
    def latency(self, dims: ViTDims | None = None) -> float:
        return self.latency_model.model_latency(dims or self.structure.live_dims())

    def latency_ratio(self) -> float:
        return self.latency() / self.dense_latency

    @property
    def next_target(self) -> float | None:
        pending = [t for t in self.targets if t not in self.reached]
        return pending[0] if pending else None

    @property
    def done(self) -> bool:
        return self.next_target is None

    def min_latency_ratio(self) -> float:
        """Latency ratio of the smallest architecture the constraints allow (one group per layer)."""
        dims = self.structure.live_dims()
        smallest = {}
        for spec in KIND_SPECS:
            live = getattr(dims, spec.dims_field)
            if spec.name not in self.kinds:
                smallest[spec.dims_field] = live
            elif spec.per_block:
                smallest[spec.dims_field] = [self.structure.layers[(spec.name, 0)].group_size] * dims.depth
            else:
                smallest[spec.dims_field] = self.structure.layers[EMB].group_size
        return self.latency(ViTDims(**smallest)) / self.dense_latency

    def check_reachable(self) -> None:
        floor = self.min_latency_ratio()
        if min(self.targets) < floor:
            raise UnreachableTargetError(
                f"latency target {min(self.targets)} is unreachable: with these group sizes the "
                f"smallest allowed model has {floor:.3f} of the dense latency")

    # ---- one event ---------------------------------------------------------------------------------
    def latency_deltas(self, dims: ViTDims) -> dict[LayerKey, float]:
        """Lat(W) − Lat(W without one group) for every layer, from one batched latency query."""
        depth, layers = dims.depth, self.structure.layers
        current = block_rows(dims)
        rows, keys = [current], []
        for kind, column in _KIND_COLUMN.items():
            reduced = current.clone()
            if kind == "emb":
                reduced[:, 0] -= layers[EMB].group_size
            else:
                for i in range(depth):
                    reduced[i, column] -= layers[(kind, i)].group_size
            # a layer down to its last group is never a candidate: query it unreduced (a width of 0
            # would fall outside a lookup table's grid)
            rows.append(torch.where(reduced >= 1, reduced, current))
            keys.append(kind)
        lat = self.latency_model.block_latency(torch.cat(rows)).double().view(len(rows), depth)
        deltas: dict[LayerKey, float] = {}
        for r, kind in enumerate(keys, start=1):
            if kind == "emb":
                reduced_emb = dims.emb - layers[EMB].group_size
                base = self.latency_model.base_latency(dims.emb) - self.latency_model.base_latency(
                    reduced_emb if reduced_emb >= 1 else dims.emb)
                deltas[EMB] = float((lat[0] - lat[r]).sum()) + base
            else:
                for i in range(depth):
                    deltas[(kind, i)] = float(lat[0, i] - lat[r, i])
        return deltas

    def rank(self, scores: Mapping[LayerKey, Tensor]) -> RankedGroups:
        """All prunable groups, lowest score first (see `RANKINGS`)."""
        dims = self.structure.live_dims()
        per_latency = self.ranking == "per_latency"
        deltas = self.latency_deltas(dims) if self.eta > 0 or per_latency else None
        keys, chunks, group_saliency = [], [], []
        for layer in self.structure:
            if layer.kind not in self.kinds:
                continue
            live = layer.live()
            allowed = live.numel() // layer.group_size - 1  # never the last group
            if allowed < 1:
                continue
            importance = scores[layer.key].detach().to(live.device)[live].double()
            if not torch.isfinite(importance).all():
                raise ValueError(f"non-finite importance scores for {layer.key}: check the loss")
            order = torch.sort(importance, stable=True).indices[: allowed * layer.group_size]
            if per_latency and deltas[layer.key] <= 0:
                continue  # removing it buys no latency (e.g. it leaves a qk = v fast kernel)
            table = order.view(allowed, layer.group_size)  # allowed, g
            keys.append(layer.key)
            chunks.append(live[table].cpu())
            group_saliency.append(importance[table].sum(1).cpu())
        if not keys:
            empty = torch.empty(0, dtype=torch.long)
            return RankedGroups(torch.empty(0, dtype=torch.float64), empty, empty, [], [])
        group_scores = group_saliency
        if deltas is not None:
            saved = [torch.full_like(g, deltas[k]) for k, g in zip(keys, group_saliency)]
            if per_latency:  # saliency lost per ms saved: a greedy knapsack under the latency budget
                group_scores = [g / d for g, d in zip(group_saliency, saved)]
            else:  # score - η·ΔLat, η in units of (mean group saliency / mean group ΔLat)
                scale = torch.cat(group_saliency).mean() / torch.cat(saved).clamp_min(0).mean().clamp_min(1e-12)
                group_scores = [g - self.eta * scale * d for g, d in zip(group_saliency, saved)]
        counts = torch.tensor([len(t) for t in chunks])
        layer_index = torch.repeat_interleave(torch.arange(len(keys)), counts)
        row = torch.arange(len(layer_index)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        flat = torch.cat(group_scores)
        order = torch.sort(flat, stable=True).indices
        return RankedGroups(flat[order], layer_index[order], row[order], keys, chunks)

    def select(self, scores: Mapping[LayerKey, Tensor], max_groups: int | None = None
               ) -> tuple[list[tuple[LayerKey, Tensor]], PruningEvent]:
        """The pruning decision: the lowest-scored groups, up to `max_groups` (default
        `groups_per_event`), cut after the first one that crosses the next target. Changes nothing."""
        max_groups = max_groups or self.groups_per_event
        dims = self.structure.live_dims()
        chosen = self.rank(scores).top(max_groups)
        # exact latency after every prefix of the chosen groups, in one batched latency query
        widths = block_rows(dims)  # depth, 5
        removed = torch.zeros(len(chosen) + 1, dims.depth, 5, dtype=torch.float64)  # prefix 0 = nothing
        for j, (key, units) in enumerate(chosen, start=1):
            if key == EMB:
                removed[j, :, 0] = units.numel()
            else:
                removed[j, key[1], _KIND_COLUMN[key[0]]] = units.numel()
        prefixes = widths - removed.cumsum(0)  # n+1, depth, 5
        latency = self.latency_model.block_latency(prefixes.view(-1, 5)).double().view(len(prefixes), -1).sum(1)
        emb = prefixes[:, 0, 0].long().tolist()
        base = {e: self.latency_model.base_latency(e) for e in set(emb)}
        latency = (latency + torch.tensor([base[e] for e in emb], dtype=torch.float64)).tolist()

        target, reached, n = self.next_target, [], len(chosen)
        if self.latency_step is not None:  # an event ends once it has saved its share of latency
            goal = latency[0] - self.latency_step * self.dense_latency
            n = next((j for j in range(1, n + 1) if latency[j] <= goal), n)
        if target is not None:
            crossing = next((j for j in range(1, n + 1) if latency[j] <= target * self.dense_latency), None)
            if crossing is not None:
                n, reached = crossing, [target]
        chosen = chosen[:n]
        pruned = dict.fromkeys(KINDS, 0)
        for key, units in chosen:
            pruned[key[0]] += units.numel()
        after_dims = dims_from_block_rows(prefixes[n]) if n else dims
        event = PruningEvent(self.events, pruned, latency[0], latency[n], latency[n] / self.dense_latency,
                             after_dims, reached)
        return chosen, event

    def step(self, scores: Mapping[LayerKey, Tensor], max_groups: int | None = None) -> PruningEvent:
        """Decide (`select`) and apply: mask the chosen groups and zero their parameter slices."""
        chosen, event = self.select(scores, max_groups)
        self.structure.prune(chosen)
        self.reached.extend(event.targets_reached)
        self.events += 1
        return event

    def state_dict(self) -> dict:
        return {"dense_latency": self.dense_latency, "reached": list(self.reached), "events": self.events,
                "targets": list(self.targets), "eta": self.eta}

    def load_state_dict(self, state: Mapping) -> None:
        if [float(t) for t in state["targets"]] != self.targets:
            raise ValueError(f"pruner state was saved with targets {state['targets']}, "
                             f"but this run has {self.targets}")
        self.dense_latency = float(state["dense_latency"])
        self.reached = [float(t) for t in state["reached"]]
        self.events = int(state["events"])


def prune_to_targets(pruner: GlobalPruner, criterion: Criterion, calibrate: Callable[[], None],
                     rescore: bool = False, on_event: Callable[[PruningEvent], None] | None = None,
                     recalibrate: Callable[[], None] | None = None) -> list[PruningEvent]:
    """One-/few-shot pruning: score on calibration data (`calibrate` runs forward/backward and
    `criterion.accumulate()`), then prune in events of `groups_per_event` groups until every target
    is reached. With `rescore`, saliency is re-measured on the pruned model before each later event
    (by `recalibrate`, e.g. on fewer batches; default `calibrate`) and joins the criterion's EMA."""
    pruner.check_reachable()
    events: list[PruningEvent] = []
    scored = False
    while not pruner.done:
        if criterion.needs_gradients and (rescore or not scored):
            (recalibrate or calibrate)() if scored else calibrate()
            criterion.end_interval()
            scored = True
        event = pruner.step(criterion.scores())
        if not any(event.pruned.values()):
            raise UnreachableTargetError(
                f"no prunable group left at {event.ratio_after:.3f} of the dense latency; target "
                f"{pruner.next_target} cannot be reached with these group sizes")
        events.append(event)
        if on_event is not None:
            on_event(event)
    return events


def build_pruning(model: torch.nn.Module, latency_model: LatencyModel, criterion: str = "hessian",
                  eta: float = 0.0, targets: Sequence[float] = (0.7,), groups_per_event: int = 8,
                  group_sizes: Mapping[str, int] | None = None, divisors: Mapping[str, float] | None = None,
                  ema_beta: float = 0.9, seed: int = 0, ranking: str = "penalty",
                  latency_step: float | None = None, kinds: Sequence[str] = KINDS
                  ) -> tuple[Structure, Criterion, GlobalPruner]:
    """Structure, criterion and pruner for a masked PrunableViT; fails early on bad values and on a
    target the group-size constraints cannot reach."""
    structure = Structure(model, group_sizes)
    scorer = build_criterion(criterion, structure, divisors=divisors, ema_beta=ema_beta, seed=seed)
    pruner = GlobalPruner(structure, latency_model, eta, groups_per_event, targets, ranking=ranking,
                          latency_step=latency_step, kinds=kinds)
    pruner.check_reachable()
    return structure, scorer, pruner
