"""Structured Optimal Brain Surgeon: the cost of removing heads and MLP neurons *after* the layer that
reads them is refit (ZipLM, Kurtic et al. 2023).

A head or an MLP neuron is a set of input columns of the layer that writes into the residual stream
(`attn.proj` for a head's V outputs, `mlp.fc2` for a neuron). For that layer, with Gram matrix
`H = Σ_tokens x xᵀ` of its inputs, removing the columns S and refitting the others by least squares
raises the output error of row c by `w_cSᵀ [H⁻¹]_SS⁻¹ w_cS`, and the refit is the update
`W ← W − W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S:` (OBS). Removing units one at a time, cheapest first, each removal
seeing the earlier updates, gives a *trace*: which unit goes k-th and the error left after k
removals. Rows are weighted by the loss's sensitivity to each output channel (the mean squared
gradient of the loss w.r.t. the layer's output, an empirical Fisher diagonal), so traces of
different layers are in the same units (estimated loss) and can be traded against each other.
The layer's bias is an input that is never removed, so a removal's mean shift is refit too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import PrunableViT

ROW_WEIGHTS = ("fisher", "uniform")


@dataclass
class RemovalTrace:
    """Greedy OBS removal of a layer's units: `order[k]` is the k-th unit removed (an index among the
    layer's units), `cost[k]` the estimated loss after the first k removals (`cost[0] = 0`)."""

    order: Tensor  # (n,) long
    cost: Tensor  # (n + 1,) float64, cumulative


@dataclass
class LayerStatistics:
    """What the traces of one writing layer need, from calibration images: the Gram matrix of its
    inputs with a constant column for the bias (in + 1, in + 1), and per output channel the summed
    squared loss gradient (out,); both per image."""

    gram: Tensor
    row_sensitivity: Tensor
    inputs: Tensor | None = None  # the first calibration images' inputs (images, tokens, in), where kept


def damped_inverse(gram: Tensor, damping: float) -> Tensor:
    """`(H + λI)⁻¹` in float64, λ = damping · mean diagonal of the weight inputs (not the bias column);
    input columns that never fire (pruned units) get λ alone, so the inverse exists. By Cholesky (half
    the work of a general inverse; the same entries to 1e-14 relative), by LU where that fails."""
    n = gram.shape[0] - 1
    h = gram.double().clone()
    h.diagonal()[:n] += damping * h.diagonal()[:n].mean().clamp_min(1e-12)
    factor, info = torch.linalg.cholesky_ex(h)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv(h)


@torch.no_grad()
def removal_trace(weight: Tensor, bias: Tensor | None, stats: LayerStatistics, units: Sequence[Tensor],
                  keep: int = 1, damping: float = 0.01, row_weights: str = "fisher",
                  removed: Tensor | None = None, lazy: int = 64) -> RemovalTrace:
    """Greedy OBS over `units` (each a tensor of input-column indices of `weight`, all the same size)
    until `keep` units are left. `weight` is (out, in); columns outside every unit stay and are refit.
    `removed`: input columns taken out (and compensated) before the trace starts, e.g. the dropped
    heads of a block before its V dims are traced; their cost is `cost[0]`. `lazy`: for single-column
    units (MLP neurons), the downdates of that many removals are gathered and applied at once
    (`_single_column_trace`: the same greedy order and costs up to float rounding); 0: each removal
    updates the weights and the inverse in place (the reference)."""
    if row_weights not in ROW_WEIGHTS:
        raise ValueError(f"row_weights must be one of {ROW_WEIGHTS}, got {row_weights!r}")
    out_features = weight.shape[0]
    bias = bias if bias is not None else weight.new_zeros(out_features)
    w = torch.cat([weight.double(), bias.double()[:, None]], 1)  # out, in + 1: the bias as an input that is always 1
    device = w.device  # statistics are kept on the CPU; the trace runs where the weights are
    h_inv = damped_inverse(stats.gram.to(device), damping)
    rows = (stats.row_sensitivity.double() if row_weights == "fisher"
            else torch.ones(out_features, dtype=torch.float64)).to(device)
    columns = torch.stack([u.to(torch.long) for u in units]).to(device)  # U, s
    start = 0.0
    if removed is not None and len(removed):
        s = removed.to(device=device, dtype=torch.long)
        hs = h_inv[s][:, s]
        ws = w[:, s]
        start = float(((ws.T * torch.linalg.solve(hs, ws.T)).sum(0) * rows).sum())
        correction = torch.linalg.solve(hs, h_inv[s])
        w -= ws @ correction
        h_inv -= h_inv[:, s] @ correction
        w[:, s] = 0
    if columns.shape[1] == 1 and lazy > 0 and len(units) > keep:
        order, steps = _single_column_trace(w, h_inv, rows, columns[:, 0], len(units) - keep, lazy)
        return RemovalTrace(order, torch.cat([steps.new_full((1,), start), steps]).cumsum(0))
    alive = torch.ones(len(units), dtype=torch.bool, device=device)
    ids = torch.arange(len(units), device=device)  # the units' indices in `units`, as they are compacted
    order, cost = [], [start]
    for _ in range(len(units) - keep):
        if int((~alive).sum()) >= max(8, len(alive) // 4):  # a quarter gone: shrink the products to the rest
            w, h_inv, columns, ids = _without_removed(w, h_inv, columns, alive, ids)
            alive = torch.ones(len(ids), dtype=torch.bool, device=device)
        ws = w[:, columns].permute(1, 2, 0)  # U, s, out
        if columns.shape[1] == 1:  # single columns (MLP neurons): [H⁻¹]_SS is a diagonal entry
            unit_cost = (ws[:, 0].square() * rows).sum(1) / h_inv.diagonal()[columns[:, 0]]
        else:
            hs = h_inv[columns[:, :, None], columns[:, None, :]]  # U, s, s
            # removed units: downdated to 0, skipped
            hs[~alive] = torch.eye(columns.shape[1], dtype=hs.dtype, device=hs.device)
            solved = torch.linalg.solve(hs, ws)  # U, s, out: [H⁻¹]_SS⁻¹ w_S
            unit_cost = ((ws * solved).sum(1) * rows).sum(1)  # U
        unit_cost[~alive] = float("inf")
        u = int(unit_cost.argmin())
        s = columns[u]
        if len(s) == 1:  # rank-1 updates in place
            j = int(s[0])
            pivot, h_row = float(h_inv[j, j]), h_inv[j].clone()
            w.addr_(w[:, j].clone(), h_row, alpha=-1.0 / pivot)
            h_inv.addr_(h_row, h_row, alpha=-1.0 / pivot)  # H⁻¹ is symmetric
        else:
            correction = torch.linalg.solve(h_inv[s][:, s], h_inv[s])  # s, in + 1: [H⁻¹]_SS⁻¹ [H⁻¹]_S:
            w -= w[:, s] @ correction
            h_inv -= h_inv[:, s] @ correction
        w[:, s] = 0
        alive[u] = False
        order.append(int(ids[u]))
        cost.append(cost[-1] + max(float(unit_cost[u]), 0.0))
    return RemovalTrace(torch.tensor(order, dtype=torch.long), torch.tensor(cost, dtype=torch.float64))


def _single_column_trace(w: Tensor, h_inv: Tensor, rows: Tensor, columns: Tensor, steps: int, lazy: int
                         ) -> tuple[Tensor, Tensor]:
    """The greedy trace of single columns without the weights: removing column u costs
    `G_uu / h_uu` with `h` the inverse restricted to the units' columns and `G = wᵀ diag(rows) w`, and
    its downdate `w ← w − w_u h_uᵀ / h_uu`, `h ← h − h_u h_uᵀ / h_uu` changes both by low rank:
    `h ← h − p pᵀ` (p = h_u / √h_uu) and `G ← G − x yᵀ − y xᵀ` (x = h_u / h_uu,
    y = g_u − G_uu / (2 h_uu) · h_u). Only the two diagonals (the costs) and the removed column's rows
    are needed at each step: they are kept current, the lower triangles of `h` and `G` get `lazy`
    downdates at once as matrix products (instead of a rank-1 pass over the whole inverse per
    removal), and the removed columns are dropped when a quarter is gone. Only the U unit `columns`
    of `w` (out, in + 1) and `h_inv` take part (the other columns' part of the refit is in `h_inv`
    already). Returns the order (indices into `columns`) and the cost of each removal (not
    cumulative)."""
    n = len(columns)
    if torch.equal(columns, torch.arange(n, device=columns.device)):  # e.g. every neuron: no gather
        w, h = w[:, :n], h_inv[:n, :n].clone()
    else:
        w, h = w[:, columns], h_inv[columns][:, columns]
    g = torch.zeros_like(h)
    _lower_addmm(g, w.T * rows, w.T, 1.0)  # wᵀ diag(rows) w, on and below the diagonal
    dh, dg = h.diagonal().clone(), g.diagonal().clone()
    ids = torch.arange(n, device=w.device)  # the columns' original indices, as they are compacted
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    p, xy = w.new_empty(n, lazy), w.new_empty(n, 2 * lazy)  # p_i; x_i, y_i interleaved
    order, costs = [], []
    k = 0  # downdates gathered in p, xy and not yet applied to h and g
    for _ in range(steps):
        unit_cost = dg / dh
        unit_cost[~alive] = float("inf")
        u = int(unit_cost.argmin())
        pivot, g_uu = dh[u], dg[u]
        h_u = torch.cat([h[u, :u], h[u:, u]]).sub_(p[:, :k] @ p[u, :k])  # row u from the lower triangle
        g_u = torch.cat([g[u, :u], g[u:, u]]).sub_(xy[:, :2 * k] @ xy[u, :2 * k].view(k, 2).flip(1).flatten())
        p[:, k] = h_u / pivot.sqrt()
        xy[:, 2 * k] = h_u / pivot
        xy[:, 2 * k + 1] = g_u - g_uu / (2 * pivot) * h_u
        dh -= p[:, k].square()
        dg -= 2 * xy[:, 2 * k] * xy[:, 2 * k + 1]
        alive[u] = False
        order.append(int(ids[u]))
        costs.append(unit_cost[u].clamp_min(0.0))
        k += 1
        if k == lazy:  # apply the gathered downdates
            _lower_addmm(h, p, p)
            _lower_addmm(g, xy, xy.view(len(xy), lazy, 2).flip(2).flatten(1))
            k = 0
            if int((~alive).sum()) >= len(alive) // 4:  # a quarter gone: drop the removed columns
                h, g = h[alive][:, alive], g[alive][:, alive]
                dh, dg, ids = dh[alive], dg[alive], ids[alive]
                p, xy = p[alive], xy[alive]
                alive = torch.ones(len(ids), dtype=torch.bool, device=w.device)
    return torch.tensor(order, dtype=torch.long), torch.stack(costs).cpu() if costs else w.new_zeros(0).cpu()


def _lower_addmm(m: Tensor, a: Tensor, b: Tensor, alpha: float = -1.0, block: int = 256) -> None:
    """`m += alpha a bᵀ` on and below the diagonal (by blocks of columns: about half the products)."""
    for i in range(0, len(m), block):
        j = min(i + block, len(m))
        m[i:, i:j].addmm_(a[i:], b[i:j].T, alpha=alpha)


def _without_removed(w: Tensor, h_inv: Tensor, columns: Tensor, alive: Tensor, ids: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The trace's state without the removed units' input columns: after its downdate a removed
    column is zero in `w` and in both directions of `h_inv`, so dropping it changes no remaining
    entry, only the size of every later product (the MLP trace of a ViT-B block: 3072 steps)."""
    keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    keep[columns[~alive].flatten()] = False
    position = keep.cumsum(0) - 1  # old column -> new column
    return w[:, keep], h_inv[keep][:, keep], position[columns[alive]], ids[alive]


def writing_layers(model: PrunableViT) -> dict[str, nn.Linear]:
    """The layers whose input columns are heads (`blocks.i.attn.proj`) and neurons (`blocks.i.mlp.fc2`)."""
    layers = {}
    for i, block in enumerate(model.blocks):
        layers[f"blocks.{i}.attn.proj"] = block.attn.proj
        layers[f"blocks.{i}.mlp.fc2"] = block.mlp.fc2
    return layers


def collect_statistics(model: PrunableViT, batches: Iterable[Sequence[Tensor]], device: str | torch.device = "cpu",
                       gradients: bool = True, progress: bool = True,
                       attention_inputs: bool = False, keep_images: int = 0) -> dict[str, LayerStatistics]:
    """Gram matrices of the inputs of every head / neuron reading layer and, with `gradients`, the
    per-channel squared loss gradients at their outputs (cross-entropy summed over the batch, so
    each image contributes its own gradient), averaged per image. With `attention_inputs`, also the
    Gram matrix of every attention's input (the normed stream q and k read: `blocks.i.attn.q`), for
    the low-rank fit of its logits (`low_rank_logits`), and its inputs on the first `keep_images`
    images (`LayerStatistics.inputs`)."""
    device = torch.device(device)
    model.to(device).eval()
    layers = writing_layers(model)
    if attention_inputs:
        layers.update({f"blocks.{i}.attn.q": block.attn.q for i, block in enumerate(model.blocks)})
    grams = {name: torch.zeros(m.in_features + 1, m.in_features + 1, dtype=torch.float64, device=device)
             for name, m in layers.items()}
    rows = {name: torch.zeros(m.out_features, dtype=torch.float64, device=device) for name, m in layers.items()}
    kept: dict[str, list[Tensor]] = {name: [] for name in layers if name.endswith(".attn.q")}

    def forward_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> None:
            if name in kept and sum(len(t) for t in kept[name]) < keep_images:
                have = sum(len(t) for t in kept[name])
                kept[name].append(inputs[0].detach()[: keep_images - have].float().cpu())
            _add_gram(grams[name], inputs[0].detach().flatten(0, -2).float())  # tokens, in
        return hook

    def backward_hook(name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple[Tensor]) -> None:
            rows[name] += grad_output[0].detach().double().square().flatten(0, -2).sum(0)
        return hook

    handles = [m.register_forward_hook(forward_hook(n)) for n, m in layers.items()]
    if gradients:
        handles += [m.register_full_backward_hook(backward_hook(n)) for n, m in layers.items()
                    if not n.endswith(".attn.q")]
    images = 0
    try:
        for batch in tqdm(list(batches), desc="layer statistics", leave=False, disable=not progress):
            x, y = batch[0].to(device).float(), batch[1].to(device)
            images += len(x)
            if gradients:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y, reduction="sum").backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    if not images:
        raise ValueError("structured OBS needs at least one calibration batch")
    return {n: LayerStatistics(_symmetric(grams[n]).cpu() / images, rows[n].cpu() / images,
                               torch.cat(kept[n]) if kept.get(n) else None) for n in layers}


GRAM_BLOCK = 256  # columns per product of `_add_gram`


def _add_gram(gram: Tensor, x: Tensor) -> None:
    """Add the Gram matrix of `[x, 1]` (x: tokens, in; float32 products, float64 sums) to the lower
    triangle of `gram` (in + 1, in + 1): by blocks of columns, the products on and below the diagonal
    only (0.54 of the work of the whole product for 3072 inputs, the same entries as it);
    `_symmetric` fills the rest."""
    x = torch.cat([x, x.new_ones(len(x), 1)], 1)
    n = x.shape[1]
    for i in range(0, n, GRAM_BLOCK):
        j = min(i + GRAM_BLOCK, n)
        gram[i:, i:j] += x[:, i:].T @ x[:, i:j]


def _symmetric(gram: Tensor) -> Tensor:
    """The symmetric matrix of which `gram` holds the lower triangle (and the diagonal)."""
    return gram.tril() + gram.tril(-1).T


@dataclass
class LogitFit:
    """Rank-r fits of one attention head's logits `x̃ᵀ M x̃'` (x̃ = [x, 1], M = W̃_q W̃_kᵀ, both with
    their bias as the last row): `q_factor` and `k_factor` (in + 1, rank) hold the best rank-r fit in
    their first r columns for every r, and `cost[r]` is the error energy `‖X̃ (M - M_r) X̃ᵀ‖²_F`
    (X̃: calibration tokens, per image) of keeping r dims."""

    q_factor: Tensor
    k_factor: Tensor
    cost: Tensor  # (rank + 1,) float64, decreasing


@torch.no_grad()
def low_rank_logits(q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor, k_bias: Tensor | None,
                    gram: Tensor, damping: float = 0.01) -> LogitFit:
    """The best rank-r approximations of a head's bilinear logit form in the metric of its inputs
    (Gram matrix `gram` of [x, 1], (in + 1, in + 1)): with G = LLᵀ, the SVD of Lᵀ M L truncated to r
    gives the fit minimising ‖X̃ (M - M_r) X̃ᵀ‖_F over all rank-r M_r, so a head whose logits have
    rank r on the calibration tokens is reproduced exactly by r q / k dims. `q_weight` / `k_weight`:
    (dims, in) slices of one head."""
    n = q_weight.shape[1]

    def tilde(w: Tensor, b: Tensor | None) -> Tensor:
        b = b if b is not None else w.new_zeros(w.shape[0])
        return torch.cat([w.double(), b.double()[:, None]], 1).T  # in + 1, dims

    qt, kt = tilde(q_weight, q_bias), tilde(k_weight, k_bias)
    g = gram.double().clone()
    g.diagonal()[:n] += damping * g.diagonal()[:n].mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(g)  # G = L Lᵀ
    # Lᵀ M L = (Lᵀ W̃_q)(Lᵀ W̃_k)ᵀ: the SVD of a product of two thin factors via their QR
    qa, ra = torch.linalg.qr(chol.T @ qt)
    qb, rb = torch.linalg.qr(chol.T @ kt)
    u, sv, vh = torch.linalg.svd(ra @ rb.T)
    scale = sv.sqrt()
    left = torch.linalg.solve_triangular(chol.T, qa @ u * scale, upper=True)  # L⁻ᵀ Ua S^½
    right = torch.linalg.solve_triangular(chol.T, qb @ vh.T * scale, upper=True)
    energy = sv.square()
    cost = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # cost[r] = Σ_{i >= r} σ_i²
    return LogitFit(left, right, cost)
