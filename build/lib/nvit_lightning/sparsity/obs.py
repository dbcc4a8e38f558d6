"""Optimal Brain Surgeon inside blocks of weights (oViT / CAP, WoodFisher).

Each row of `w` (rows, B) is one block with the inverse of its damped Fisher `finv` (rows, B, B).
Removing weight q costs ρ_q = w_q² / (2 [F⁻¹]_qq) (the quadratic model of the loss) and the other
weights of the block compensate with δw = −(w_q / [F⁻¹]_qq) F⁻¹_{:,q}; F⁻¹ is then downdated to the
inverse over the remaining weights, F⁻¹ ← F⁻¹ − F⁻¹_{:,q} F⁻¹_{q,:} / [F⁻¹]_qq. Removing a set Q one
weight at a time this way equals the joint closed-form update −F⁻¹_{:,Q} (F⁻¹_{QQ})⁻¹ w_Q.

- `greedy` (oViT / CAP, "correlation-aware"): the next weight is the cheapest one *after* the
  earlier removals and their updates;
- `static` (WoodFisher): the order is fixed by the scores of the unpruned block; the removed set is
  still compensated jointly.
"""

from __future__ import annotations

import torch
from torch import Tensor

ORDERS = ("greedy", "static")
CHUNK_ROWS = 2048  # blocks processed together: bounds the B x B temporaries


def obs_scores(w: Tensor, finv: Tensor) -> Tensor:
    """ρ = w² / (2 diag F⁻¹) per weight (rows, B)."""
    return w.pow(2) / (2 * finv.diagonal(dim1=-2, dim2=-1).clamp_min(1e-20))


def _remove(w: Tensor, finv: Tensor, q: Tensor) -> None:
    """Remove weight q[r] of every block r in place: compensate the others, downdate F⁻¹."""
    rows = torch.arange(len(q), device=w.device)
    col = finv[rows, :, q]  # rows, B  (F⁻¹ is symmetric: column q = row q)
    d = col[rows, q].clamp_min(1e-20)
    w.sub_((w[rows, q] / d)[:, None] * col)
    finv.baddbmm_(col[:, :, None], (col / d[:, None])[:, None, :], alpha=-1.0)  # rank-1, no B x B temporary
    # exactly zero, not rounding noise: later updates then leave the removed weights at exactly 0
    finv[rows, q, :] = 0.0
    finv[rows, :, q] = 0.0
    w[rows, q] = 0.0


def obs_order(w: Tensor, finv: Tensor, order: str = "greedy", steps: int | None = None,
              first: Tensor | None = None, nm: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The removal order of each block and the loss ρ of each removal: (rows, steps) indices and
    losses. `first` (rows, B) marks weights removed before all others at no cost (padding, weights
    already pruned); `nm = (n, m)` allows at most m − n removals in every m consecutive weights."""
    if order not in ORDERS:
        raise ValueError(f"unknown OBS order '{order}': use one of {ORDERS}")
    rows, size = w.shape
    steps = size if steps is None else steps
    first = torch.zeros_like(w, dtype=torch.bool) if first is None else first
    if order == "static" and nm is None:
        scores = obs_scores(w, finv).masked_fill(first, -1.0)
        losses, idx = scores.sort(dim=1)
        return idx[:, :steps], losses[:, :steps].clamp_min(0.0)
    idx = torch.empty(rows, steps, dtype=torch.long, device=w.device)
    losses = torch.empty(rows, steps, dtype=w.dtype, device=w.device)
    for lo in range(0, rows, CHUNK_ROWS):
        sl = slice(lo, lo + CHUNK_ROWS)
        idx[sl], losses[sl] = _greedy(w[sl].clone(), finv[sl].clone(), steps, first[sl], nm, order == "static")
    return idx, losses


def _greedy(w: Tensor, finv: Tensor, steps: int, first: Tensor, nm: tuple[int, int] | None,
            static: bool) -> tuple[Tensor, Tensor]:
    rows, size = w.shape
    removed = torch.zeros_like(w, dtype=torch.bool)
    fixed = obs_scores(w, finv) if static else None
    idx = torch.empty(rows, steps, dtype=torch.long, device=w.device)
    losses = torch.empty(rows, steps, dtype=w.dtype, device=w.device)
    for t in range(steps):
        scores = (fixed if static else obs_scores(w, finv)).masked_fill(first & ~removed, -1.0)
        blocked = removed
        if nm is not None:  # groups of m that already lost m - n weights take no more removals
            n, m = nm
            full = removed.view(rows, size // m, m).sum(-1, keepdim=True) >= m - n
            blocked = blocked | full.expand(-1, -1, m).reshape(rows, size)
        q = scores.masked_fill(blocked, float("inf")).argmin(dim=1)
        idx[:, t] = q
        losses[:, t] = scores.gather(1, q[:, None]).squeeze(1).clamp_min(0.0)
        _remove(w, finv, q)
        removed[torch.arange(rows, device=w.device), q] = True
    return idx, losses


def obs_prune(w: Tensor, finv: Tensor, order: Tensor, counts: list[Tensor]) -> list[Tensor]:
    """The compensated blocks after removing the first `counts[s][r]` weights of `order[r]`, for
    each level s: one (rows, B) tensor per entry of `counts`."""
    outs = [w.clone() for _ in counts]
    for lo in range(0, len(w), CHUNK_ROWS):
        sl = slice(lo, lo + CHUNK_ROWS)
        cw, cf = w[sl].clone(), finv[sl].clone()
        levels = [c[sl] for c in counts]
        for t in range(int(max(c.max() for c in levels).item()) if len(cw) else 0):
            _remove(cw, cf, order[sl, t])
            for out, c in zip(outs, levels):
                done = c == t + 1
                out[sl][done] = cw[done]
    return outs
