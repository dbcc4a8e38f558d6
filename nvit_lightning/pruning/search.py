"""Latency-constrained structured pruning in one shot (ZipLM-style): per-block widths chosen by a
dynamic program over the structured-OBS removal traces, under a latency-model budget. Optionally
(`depth`) whole attention / MLP sub-layers, and (`head_dims`) the q/k and v width of the heads.

For every block and every (heads removed, MLP neurons removed) pair, the estimated loss is the sum of
the two layers' trace costs (`structured_obs`) and the latency is the latency model's prediction for
that block. A knapsack over the blocks picks one pair per block with the least total cost whose
predicted latency meets the target; one set of traces serves every target, so a family of speed-ups
comes from one pass over the calibration images. Which heads / neurons go is the traces' order.

With `emb`, the residual stream's width too: the model is first put in the principal basis of its
stream (`stream_basis.py`, the same function), the traces are taken there, and the knapsack runs once
per candidate width with that width's latencies; the width's cost (the writers' energy in the channels
it drops) is added, and the least total cost wins.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..latency.models import LatencyModel
from ..models import PrunableViT, ViTDims
from .base import Pruner
from .groups import Structure
from .interrupt import Checkpoint, from_state, raise_if_stop_requested, to_state
from .pruner import UnreachableTargetError
from .stream_basis import StreamBasis, check_rotatable, in_basis, measure_basis, narrow_stream
from .structured_obs import (
    ROW_WEIGHTS,
    LayerStatistics,
    LogitFit,
    RemovalTrace,
    collect_statistics,
    low_rank_logits,
    removal_trace,
)

log = logging.getLogger("nvit_lightning")

# dim: the q/k and v width per head, cut together (qk = v); emb: the residual stream's width
SEARCH_KINDS = ("head", "mlp", "dim", "emb")
SAVED_TYPES = (LayerStatistics, LogitFit, RemovalTrace, StreamBasis)  # what a search checkpoint holds


@dataclass
class BlockOptions:
    """The widths one block may take: `removed[j] = (heads, neurons)` with estimated loss `cost[j]`
    and predicted block latency `latency[j]` (ms). `mixes[j]`: whether option j keeps an attention
    (tokens exchange information there); None: every option does. `rows[j]`: the latency model's
    (emb, heads, qk, v, mlp) row of option j, to price it at another stream width."""

    removed: list[tuple[int, int]]
    cost: Tensor  # (n,) float64
    latency: Tensor  # (n,) float64
    mixes: Tensor | None = None  # (n,) bool
    rows: Tensor | None = None  # (n, 5) float64

    def at_width(self, latency_model: LatencyModel, emb: int) -> BlockOptions:
        """The same options with the stream `emb` wide (same costs, that width's latencies)."""
        rows = self.rows.clone()
        rows[:, 0] = emb
        return BlockOptions(self.removed, self.cost, latency_model.block_latency(rows).double(), self.mixes, rows)


def cheapest_under_budget(blocks: Sequence[BlockOptions], budget: float, bins: int = 4000) -> list[int]:
    """One option per block, least total cost with total latency <= `budget` (ms): a dynamic program
    over latency discretised into `bins` steps, each option's latency rounded *up*, so the chosen
    widths never exceed the budget. At least one chosen option keeps an attention (`mixes`): without
    one, the class token never reads a patch and the logits do not depend on the image."""
    mixes = [torch.ones(len(b.cost), dtype=torch.bool) if b.mixes is None else b.mixes.bool() for b in blocks]
    lowest = sum(float(b.latency.min()) for b in blocks)
    if not any(bool(m.any()) for m in mixes):
        raise UnreachableTargetError("no block can keep an attention: the logits would not depend on the image")
    lowest += min(float(b.latency[m].min() - b.latency.min()) for b, m in zip(blocks, mixes) if bool(m.any()))
    if lowest > budget:
        raise UnreachableTargetError(f"the smallest allowed widths need {lowest:.2f} ms of block latency, "
                                     f"over the budget of {budget:.2f} ms")
    step = budget / bins
    # best[s, a]: least cost at exactly s steps, a = whether an attention is kept yet
    best = torch.full((bins + 1, 2), math.inf, dtype=torch.float64)
    best[0, 0] = 0.0
    choices = []
    for block, mix in zip(blocks, mixes):
        best, choice = _add_block(best, torch.ceil(block.latency / step - 1e-9).long(), block.cost.double(), mix)
        choices.append(choice)
    if not torch.isfinite(best[:, 1]).any():  # only by rounding: the budget is within one step of the floor
        raise UnreachableTargetError(f"no widths fit the budget of {budget:.2f} ms at this resolution")
    at, state, picks = int(best[:, 1].argmin()), 1, []
    for block, choice in zip(reversed(blocks), reversed(choices)):
        j, previous = int(choice[at, state, 0]), int(choice[at, state, 1])
        picks.append(j)
        at -= int(torch.ceil(block.latency[j] / step - 1e-9))
        state = previous
    return picks[::-1]


def _add_block(best: Tensor, steps: Tensor, cost: Tensor, mix: Tensor, chunk: int = 128) -> tuple[Tensor, Tensor]:
    """One step of `cheapest_under_budget`'s program: from `best` (bins + 1, 2), the least cost per state
    after one more block whose options take `steps` latency steps at `cost`, and the (option,
    previous a) that gives it (-1 where no option reaches the state); ties go to the first pair in
    (option, previous a) order, as in a loop over the options that keeps strict improvements. Of the
    options of equal steps only the cheapest (the first of equal cost) can give a state its least
    cost, so only they are tried, all at once (a chunk of pairs per product), on the states that
    the finite entries of `best` can reach."""
    bins = best.shape[0] - 1
    new = torch.full_like(best, math.inf)
    choice = torch.full((bins + 1, 2, 2), -1, dtype=torch.long)
    mix = mix.bool()
    finite = torch.isfinite(best)
    first_finite = finite.float().argmax(0)  # per previous a: the reachable states' range
    last_finite = bins - finite.flip(0).float().argmax(0)
    for a in (0, 1):  # a: whether an attention is kept after this block
        pairs = []  # (option, previous a) pairs that lead to a, the cheapest per step count
        for b, allowed in (((0, ~mix),) if a == 0 else ((0, mix), (1, torch.ones_like(mix)))):
            if finite[:, b].any() and allowed.any():
                kept = _cheapest_per_step(allowed.nonzero().flatten(), steps, cost)
                pairs.append(torch.stack([kept, torch.full_like(kept, b)], 1))
        if not pairs:
            continue
        pairs = torch.cat(pairs)
        pairs = pairs[torch.argsort(pairs[:, 0] * 2 + pairs[:, 1])]  # (option, previous a) order
        for o, b in (chunk_pairs.T for chunk_pairs in pairs.split(chunk)):
            first = int((steps[o] + first_finite[b]).min())
            last = min(bins, int((steps[o] + last_finite[b]).max()))
            if first > last:
                continue
            at = torch.arange(first, last + 1)
            source = at[None, :] - steps[o][:, None]  # pairs, states: the state each pair comes from
            candidate = best[source.clamp_min(0), b[:, None]] + cost[o][:, None]
            candidate[source < 0] = math.inf
            value, k = candidate.min(0)  # the first pair of least cost
            better = value < new[first:last + 1, a]
            index = at[better]
            new[index, a] = value[better]
            choice[index, a, 0], choice[index, a, 1] = o[k[better]], b[k[better]]
    return new, choice


def _cheapest_per_step(options: Tensor, steps: Tensor, cost: Tensor) -> Tensor:
    """Of `options` (increasing indices), per distinct step count the one of least cost (the first of
    equal cost), in increasing order."""
    by_cost = options[torch.sort(cost[options], stable=True).indices]
    by_steps = by_cost[torch.sort(steps[by_cost], stable=True).indices]  # by steps, then cost, then index
    s = steps[by_steps]
    first = torch.ones(len(s), dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    return by_steps[first].sort().values


def _kept_widths(n: int, group_size: int, depth: bool = False) -> list[int]:
    """Widths a layer of n live units may keep: all of them, or whole groups (at least one; with
    `depth`, also none: the sub-layer removed)."""
    widths = [n, *range(group_size * ((n - 1) // group_size), 0, -group_size)] if n else []
    return [*widths, 0] if depth or not n else widths


def _trace(weight: Tensor, bias: Tensor | None, stats, units: list[Tensor], keep: int, damping: float,
           row_weights: str) -> RemovalTrace:
    """`removal_trace`, also for a layer with no units left (an empty trace)."""
    if not units:
        return RemovalTrace(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.float64))
    return removal_trace(weight, bias, stats, units, min(keep, len(units)), damping, row_weights)


@torch.no_grad()
def _logit_fit_costs(a, h: int, qk_live: Tensor, v_live: Tensor, fit: LogitFit, x: Tensor, ranks: Sequence[int],
                     out_rows: Tensor) -> dict[int, float]:
    """Per rank r: the (row-weighted) squared error per image of head h's output through `proj` when
    its q/k are the rank-r logit fit instead of the original, on the attention inputs `x` (images,
    tokens, in): what narrowing the head's q/k costs in the units of the V trace."""
    dev = a.q.weight.device
    x = x.to(dev)
    rows = h * a.qk_dim + qk_live.to(dev)
    q = F.linear(x, a.q.weight[rows], None if a.q.bias is None else a.q.bias[rows])
    k = F.linear(x, a.k.weight[rows], None if a.k.bias is None else a.k.bias[rows])
    cols = h * a.v_dim + v_live.to(dev)
    v = F.linear(x, a.v.weight[cols], None if a.v.bias is None else a.v.bias[cols])
    w_out = a.proj.weight[:, cols].double()  # out, v
    weights = out_rows.to(dev).sqrt()

    def output(q: Tensor, k: Tensor) -> Tensor:
        attn = torch.softmax(a.scale * q @ k.transpose(-1, -2), dim=-1)
        return (attn @ v).double() @ w_out.T * weights  # images, tokens, out

    full = output(q, k)
    xt = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1).double()
    costs = {}
    for r in ranks:
        if r == len(qk_live):
            costs[r] = 0.0
            continue
        qr = (xt @ fit.q_factor[:, :r].to(dev)).float()
        kr = (xt @ fit.k_factor[:, :r].to(dev)).float()
        costs[r] = float((output(qr, kr) - full).square().sum()) / len(x)
    return costs


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
    depth: a block's attention or MLP may lose every head / neuron (the sub-layer is removed, its
    writer's bias stays) where the latency model says it pays; `depth_cost` multiplies the trace cost
    of such a removal (> 1: removals of whole sub-layers are trusted less than the local trace says).
    head_dims: a block's heads may also be narrowed, q/k and v alike (qk = v = d, in steps of
    `group_sizes.dim`; equal widths keep the fused attention kernels the latency table prices on
    its qk = v part): V dims by an OBS trace through `proj` (after the block's dropped heads), the
    q/k dims by the best rank-d fit of each kept head's logits on the calibration tokens
    (`low_rank_logits`, written into the pruned model's q and k). The q/k cost is measured: each kept
    head's output through `proj` with the fitted q/k against the original, on the first `qk_images`
    calibration images (the V trace's units), times `qk_cost`.
    emb: the residual stream may be narrowed too, to multiples of `group_sizes.emb` (within the latency
    table's emb grid): the model is put in the principal basis of its stream on the calibration images
    (`stream_basis.py`, the same function; `pruned_from` holds it after a call, the dense reference
    the pruned copies' refit must use) and keeps its leading channels. A width's cost is the energy
    per image the writers (embedding, attention and MLP branches) put in the channels it drops, times
    `emb_cost` (uniform over channels: with `row_weights=fisher` the traces are in other units and
    `emb_cost` has to absorb the difference).
    """

    name = "obs_search"
    saves_progress = True

    def __init__(self, target: float = 0.7, snapshots: Sequence[float] = (),
                 group_sizes: Mapping[str, int] | None = None, damping: float = 0.01,
                 row_weights: str = "fisher", bins: int = 4000, depth: bool = False,
                 depth_cost: float = 1.0, head_dims: bool = False, qk_cost: float = 1.0,
                 qk_images: int = 16, emb: bool = False, emb_cost: float = 1.0) -> None:
        self.targets = sorted({float(t) for t in (target, *snapshots)}, reverse=True)
        if any(not 0.0 < t < 1.0 for t in self.targets):
            raise ValueError(f"latency targets must lie strictly between 0 and 1, got {self.targets}")
        self.target = float(target)
        sizes = {"head": 1, "mlp": 16, "dim": 8, "emb": 32, **(group_sizes or {})}
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
        if not depth_cost > 0:
            raise ValueError(f"depth_cost must be > 0, got {depth_cost}")
        self.depth, self.depth_cost = bool(depth), float(depth_cost)
        if not qk_cost >= 0:
            raise ValueError(f"qk_cost must be >= 0, got {qk_cost}")
        self.head_dims, self.qk_cost = bool(head_dims), float(qk_cost)
        if qk_images < 1:
            raise ValueError(f"qk_images must be >= 1, got {qk_images}")
        self.qk_images = int(qk_images)
        if not emb_cost >= 0:
            raise ValueError(f"emb_cost must be >= 0, got {emb_cost}")
        self.emb, self.emb_cost = bool(emb), float(emb_cost)
        self.pruned_from: PrunableViT | None = None  # with emb: the rotated dense model of the last call

    # ---- traces ----------------------------------------------------------------------------------------
    def traces(self, model: PrunableViT, batches: Sequence[Sequence[Tensor]], device: str | torch.device = "cpu",
               progress: bool = True, checkpoint: Checkpoint | None = None
               ) -> list[dict[str, tuple[Tensor, RemovalTrace]]]:
        """Per block: kind -> (live unit indices, their removal trace), from calibration `batches`.
        With `checkpoint`, the statistics (`<checkpoint>.statistics.pt`) and every block's traces are
        saved as they are done, a requested stop takes effect after them, and a saved state is gone on
        from (the same traces as an uninterrupted call)."""
        checkpoint = checkpoint or Checkpoint(None)
        saved = checkpoint.load()
        out = [] if saved is None else from_state(saved["blocks"], SAVED_TYPES)
        if len(out) == len(model.blocks):
            return out
        head_dims = self._head_dims(model)
        stats = self._statistics(model, batches, device, progress, head_dims, checkpoint.part("statistics"))
        # minutes for wide MLPs (ViT-B: 3072 neurons per block on 2 CPU cores): show the blocks done
        for i in tqdm(range(len(out), len(model.blocks)), desc="removal traces", disable=not progress, leave=False,
                      initial=len(out), total=len(model.blocks)):
            a, mlp = model.blocks[i].attn, model.blocks[i].mlp
            heads = a.head_mask.nonzero().flatten()
            v_cols = a.v_mask.nonzero().flatten()
            head_units = [h * a.v_dim + v_cols for h in heads.tolist()]
            neurons = mlp.mask.nonzero().flatten()
            keep = 0 if self.depth else 1  # with depth, the trace runs on to the last unit
            out.append({
                "head": (heads, _trace(a.proj.weight, a.proj.bias, stats[f"blocks.{i}.attn.proj"],
                                       head_units, keep, self.damping, self.row_weights)),
                "mlp": (neurons, _trace(mlp.fc2.weight, mlp.fc2.bias, stats[f"blocks.{i}.mlp.fc2"],
                                        list(neurons[:, None]), keep, self.damping, self.row_weights)),
            })
            if head_dims and len(heads):
                out[-1].update(self._dim_traces(a, heads, out[-1]["head"][1], stats[f"blocks.{i}.attn.proj"],
                                                stats[f"blocks.{i}.attn.q"]))
            checkpoint.save({"blocks": to_state(out)})
            raise_if_stop_requested(f"block {i + 1} of {len(model.blocks)} of the search's removal traces")
        return out

    def _statistics(self, model: PrunableViT, batches: Sequence[Sequence[Tensor]], device: str | torch.device,
                    progress: bool, head_dims: bool, checkpoint: Checkpoint) -> dict[str, LayerStatistics]:
        """The layer statistics of the calibration images: collected (one step) and saved, or as saved."""
        saved = checkpoint.load()
        if saved is not None:
            return from_state(saved["statistics"], SAVED_TYPES)
        stats = collect_statistics(copy.deepcopy(model), batches, device, gradients=self.row_weights == "fisher",
                                   progress=progress, attention_inputs=head_dims,
                                   keep_images=self.qk_images if head_dims else 0)
        checkpoint.save({"statistics": to_state(stats)})
        raise_if_stop_requested("the search's layer statistics")
        return stats

    def _head_dims(self, model: PrunableViT) -> bool:
        """Whether head widths are searched: asked for, and possible (qk = v live widths everywhere, no
        qk_norm, whose per-head LayerNorm a low-rank refit of q and k cannot go through)."""
        if not self.head_dims:
            return False
        dims = model.live_dims()
        if dims.qk != dims.v or model.config.get("qk_norm", False):
            log.warning("head widths not searched: they need qk = v in every block and no qk_norm")
            return False
        return True

    def _dim_traces(self, a, heads: Tensor, head_trace: RemovalTrace, proj_stats, q_stats) -> dict:
        """Per number of heads dropped (in the head trace's order): the V trace of the kept heads through
        `proj`, the dropped heads removed first; and each head's low-rank fit of its logits."""
        v_live, qk_live = a.v_mask.nonzero().flatten(), a.qk_mask.nonzero().flatten()
        g = self.group_sizes["dim"]
        v_traces = {}
        for dropped in range(len(heads)):
            gone = heads[head_trace.order[:dropped]].tolist()
            kept = [h for h in heads.tolist() if h not in gone]
            removed = torch.tensor([h * a.v_dim + j for h in gone for j in v_live.tolist()], dtype=torch.long)
            units = [torch.tensor([h * a.v_dim + j for h in kept]) for j in v_live.tolist()]
            v_traces[dropped] = removal_trace(a.proj.weight, a.proj.bias, proj_stats, units, min(g, len(units)),
                                              self.damping, self.row_weights, removed)
        fits, costs = {}, {}
        ranks = _kept_widths(len(qk_live), g)
        out_rows = (proj_stats.row_sensitivity.double() if self.row_weights == "fisher"
                    else torch.ones(a.proj.out_features, dtype=torch.float64))
        for h in heads.tolist():
            rows = h * a.qk_dim + qk_live
            fits[h] = low_rank_logits(a.q.weight[rows], None if a.q.bias is None else a.q.bias[rows],
                                      a.k.weight[rows], None if a.k.bias is None else a.k.bias[rows],
                                      q_stats.gram, self.damping)
            costs[h] = _logit_fit_costs(a, h, qk_live, v_live, fits[h], q_stats.inputs, ranks, out_rows)
        return {"v": (v_live, v_traces), "qk": (qk_live, fits, costs)}

    def options(self, model: PrunableViT, latency_model: LatencyModel,
                traces: Sequence[Mapping[str, tuple[Tensor, RemovalTrace]]]) -> list[BlockOptions]:
        """Every block's allowed (heads, neurons) removals with their trace cost and block latency."""
        dims = model.live_dims()
        blocks = []
        for i, trace in enumerate(traces):
            n_heads, n_mlp = len(trace["head"][0]), len(trace["mlp"][0])
            n_dim = dims.v[i] if "v" in trace else 0
            removed = [(n_heads - kept_heads, n_mlp - kept_mlp, n_dim - kept_dim if kept_heads else 0)
                       for kept_heads in _kept_widths(n_heads, self.group_sizes["head"], self.depth)
                       for kept_mlp in _kept_widths(n_mlp, self.group_sizes["mlp"], self.depth)
                       for kept_dim in (self._dim_widths(latency_model, n_dim) if kept_heads and n_dim
                                        else [n_dim])]
            rows = torch.tensor([[dims.emb, n_heads - h, dims.qk[i] - d, dims.v[i] - d, n_mlp - m]
                                 for h, m, d in removed], dtype=torch.float64)
            cost = torch.tensor([self._head_cost(trace, h, d, n_heads) + self._cost(trace, "mlp", m, n_mlp)
                                 for h, m, d in removed], dtype=torch.float64)
            mixes = torch.tensor([h < n_heads for h, _, _ in removed], dtype=torch.bool)
            blocks.append(BlockOptions(removed, cost, latency_model.block_latency(rows).double(), mixes, rows))
        return blocks

    # ---- the stream's width ----------------------------------------------------------------------------
    def _emb_widths(self, model: PrunableViT, latency_model: LatencyModel, warn: bool = True) -> list[int]:
        """Stream widths the search may keep: the full one; with `emb`, also whole groups (at least 2
        channels, within the latency table's emb grid), where the model's stream can be rotated."""
        full = model.live_dims().emb
        if not self.emb:
            return [full]
        try:
            check_rotatable(model)
        except ValueError as err:
            if warn:
                log.warning(f"the stream width is not searched: {err}")
            return [full]
        grids = [getattr(latency_model, "grid", {}).get("emb"), getattr(latency_model, "base_emb", None)]
        lowest = max([2.0] + [float(g[0]) for g in grids if g is not None])
        return [w for w in _kept_widths(full, self.group_sizes["emb"]) if w >= lowest]

    def _basis(self, model: PrunableViT, batches: Sequence[Sequence[Tensor]], device: str | torch.device,
               checkpoint: Checkpoint) -> StreamBasis:
        """The principal basis of the stream on the calibration images: measured and saved, or as saved."""
        saved = checkpoint.load()
        if saved is not None:
            return from_state(saved["basis"], SAVED_TYPES)
        basis = measure_basis(model, [b[0] for b in batches], device)
        checkpoint.save({"basis": to_state(basis)})
        raise_if_stop_requested("the search's stream basis")
        return basis

    def _emb_costs(self, basis: StreamBasis, widths: Sequence[int]) -> dict[int, float]:
        """Per stream width: `emb_cost` x the writers' energy per image in the channels it drops."""
        return {w: self.emb_cost * float(basis.energy[w:].sum()) for w in widths}

    def _cheapest(self, blocks: Mapping[int, Sequence[BlockOptions]], latency_model: LatencyModel, budget: float,
                  emb_costs: Mapping[int, float]) -> tuple[int, list[int]]:
        """The stream width and per-block options of least total cost within `budget` (ms, the whole
        model's): one knapsack per width, on that width's block latencies and the rest of its budget."""
        best, error = None, None
        for width, options in blocks.items():
            try:
                picks = cheapest_under_budget(options, budget - latency_model.base_latency(width), self.bins)
            except UnreachableTargetError as err:
                error = error or err  # the widest's: what a target out of reach at every width says
                continue
            cost = emb_costs[width] + sum(float(b.cost[j]) for b, j in zip(options, picks))
            if best is None or cost < best[0]:
                best = (cost, width, picks)
        if best is None:
            raise error
        return best[1], best[2]

    @torch.no_grad()
    def _narrow(self, a, i: int, trace: Mapping, dropped: int, narrowed: int) -> list:
        """Write each kept head's rank-(qk - narrowed) logit fit into the first q/k dims of `a` (a pruned
        copy's attention); the groups that remove the other q/k dims and the traced V dims."""
        heads, head_trace = trace["head"]
        v_live, v_traces = trace["v"]
        qk_live, fits, _ = trace["qk"]
        rank = len(qk_live) - narrowed
        gone = set(heads[head_trace.order[:dropped]].tolist())
        for h in heads.tolist():
            if h in gone:
                continue
            rows = h * a.qk_dim + qk_live[:rank]
            fit: LogitFit = fits[h]
            for layer, factor in ((a.q, fit.q_factor), (a.k, fit.k_factor)):
                layer.weight[rows] = factor[:-1, :rank].T.to(layer.weight.dtype)
                if layer.bias is not None:
                    layer.bias[rows] = factor[-1, :rank].to(layer.bias.dtype)
        return [(("qk", i), qk_live[rank:]), (("v", i), v_live[v_traces[dropped].order[:narrowed]])]

    def _dim_widths(self, latency_model: LatencyModel, n_dim: int) -> list[int]:
        """Head widths a block may keep: whole groups; with a table's qk = v part, only its profiled
        widths (between them it interpolates across kernels whose speed is not linear in the width:
        qk = v = 48 measured 0.90-0.98 of the dense latency where 32 and 64 predict 0.91)."""
        widths = _kept_widths(n_dim, self.group_sizes["dim"])
        grid = getattr(latency_model, "same_qk_v_grid", None)
        if grid is None:
            return widths
        profiled = {int(g) for g in grid.tolist()}
        return [w for w in widths if w == n_dim or w in profiled]

    def _head_cost(self, trace: Mapping, dropped: int, narrowed: int, n_heads: int) -> float:
        """Estimated loss of dropping `dropped` heads and narrowing the others by `narrowed` q/k and v dims."""
        if not narrowed:
            return self._cost(trace, "head", dropped, n_heads)
        heads, head_trace = trace["head"]
        v_cost = float(trace["v"][1][dropped].cost[narrowed])  # includes the dropped heads (cost[0])
        qk_live, _, costs = trace["qk"]
        kept = set(heads.tolist()) - set(heads[head_trace.order[:dropped]].tolist())
        return v_cost + self.qk_cost * sum(float(costs[h][len(qk_live) - narrowed]) for h in kept)

    def _cost(self, trace: Mapping[str, tuple[Tensor, RemovalTrace]], kind: str, count: int, n: int) -> float:
        """The trace cost of removing `count` of a layer's `n` units (x depth_cost for all of them)."""
        cost = float(trace[kind][1].cost[count])
        return cost * self.depth_cost if n and count == n else cost

    # ---- pruning ---------------------------------------------------------------------------------------
    def check(self, model: PrunableViT, latency_model: LatencyModel) -> None:
        """Refuse a model the search cannot prune, or a target below the latency that the fewest
        heads and MLP neurons leave (the floor): callers run it before any other work."""
        if not model.masked:
            raise ValueError("the latency search prunes a masked PrunableViT: call model.with_masks() first")
        dims = model.live_dims()
        if not any(dims.heads):
            raise ValueError("the model has no attention left: its logits do not depend on the image")
        emb = min(self._emb_widths(model, latency_model, warn=False))
        least = 0 if self.depth else 1  # groups of units a head / MLP layer keeps at least
        heads = [min(h, least * self.group_sizes["head"]) for h in dims.heads]
        mlp = [min(m, least * self.group_sizes["mlp"]) for m in dims.mlp]
        # with depth, one block keeps one group of heads (a path from the patches to the class token)
        options = [ViTDims(emb, [min(h, self.group_sizes["head"]) if j == i else heads[j]
                                 for j, h in enumerate(dims.heads)], dims.qk, dims.v, mlp)
                   for i in range(dims.depth) if dims.heads[i]] if self.depth else [ViTDims(emb, heads, dims.qk,
                                                                                             dims.v, mlp)]
        floor = min(latency_model.model_latency(d) for d in options) / latency_model.model_latency(dims)
        if min(self.targets) < floor:
            raise UnreachableTargetError(
                f"latency target {min(self.targets)} is unreachable: removing heads and MLP neurons "
                f"{f'and narrowing the stream to {emb}' if emb < dims.emb else 'alone'} "
                f"(group sizes {self.group_sizes}{', whole sub-layers' if self.depth else ''}) leaves at least "
                f"{floor:.3f} of the dense latency (pruner.target >= {floor:.3f}"
                f"{'' if self.depth else ', pruner.depth=true'}, or a smaller pruner.group_sizes)")

    def __call__(self, model: PrunableViT, latency_model: LatencyModel, batches: Sequence[Sequence[Tensor]],
                 device: str | torch.device = "cpu", progress: bool = True, checkpoint: Checkpoint | None = None
                 ) -> dict[float, PrunableViT]:
        """A pruned (masked, not refit) copy of `model` per target, from calibration `batches` of
        (images, labels); `model` is left untouched. `checkpoint`: see `traces`."""
        self.check(model, latency_model)  # before any statistics are collected
        dims = model.live_dims()
        dense_latency = latency_model.model_latency(dims)
        widths = self._emb_widths(model, latency_model)
        self.pruned_from, emb_costs = None, {dims.emb: 0.0}
        if len(widths) > 1:  # the stream's principal basis: traces, costs and pruned copies all in it
            basis = self._basis(model, batches, device, (checkpoint or Checkpoint(None)).part("basis"))
            model = self.pruned_from = in_basis(model, basis)
            emb_costs = self._emb_costs(basis, widths)
        traces = self.traces(model, batches, device, progress, checkpoint)
        options = self.options(model, latency_model, traces)
        by_width = {w: options if w == dims.emb else [b.at_width(latency_model, w) for b in options] for w in widths}
        pruned = {}
        for target in self.targets:
            emb, picks = self._cheapest(by_width, latency_model, target * dense_latency, emb_costs)
            blocks = by_width[emb]
            pruned_model = copy.deepcopy(model)
            groups = []
            for i, (block, j) in enumerate(zip(blocks, picks)):
                dropped, neurons, narrowed = block.removed[j]
                for kind, count in (("head", dropped), ("mlp", neurons)):
                    units, trace = traces[i][kind]
                    if count:
                        groups.append(((kind, i), units[trace.order[:count]]))
                if narrowed:
                    groups += self._narrow(pruned_model.blocks[i].attn, i, traces[i], dropped, narrowed)
            Structure(pruned_model, {"head": 1, "mlp": 1}).prune(groups, removable=("head", "mlp"))
            if emb < dims.emb:
                narrow_stream(pruned_model, emb)
            pruned[target] = pruned_model
            kept = pruned_model.live_dims()
            log.info(f"target {target}: {latency_model.model_latency(kept) / dense_latency:.3f} of the dense "
                     f"predicted latency; heads {list(kept.heads)}, mlp {list(kept.mlp)}"
                     + (f", qk = v {list(kept.qk)}" if kept.qk != dims.qk else "")
                     + (f", emb {kept.emb}" if kept.emb != dims.emb else ""))
        return pruned
