"""Masked least-squares refit of a sparse model: each row of each sparse linear re-solved on its own
surviving inputs, zeros held exactly.

The structured refit (`pruning/reconstruct.py`) solves a whole layer on the kept structures. In a
sparse layer every output row keeps its own set of inputs, so the refit is one small ridge regression
per row: for row r with support S_r (its nonzero weights) and the layer's normal equations
`H = XᵀX`, `C = XᵀY` over calibration tokens (X with a ones column for the bias),

    w_r[S_r] = (H[S_r, S_r] + λ I)⁻¹ (C[S_r, r] + λ w⁰_r[S_r]),   w_r elsewhere = 0,

with `λ = damping · mean(diag H)` pulling towards the current (OBS-updated) weights and the bias
unpenalised. Solved in batches of rows, each on its own support (gathered, padded with identity rows
to the batch's largest support), so the solution is exactly zero off the support.

OBS's own update compensates each removal for the loss's (empirical Fisher) curvature within a block
of 64 weights; this refit compensates for the layer's actual inputs, over the whole row, after all
removals, and with error feedback: blocks are refit in order on the stream the already-refit blocks
produce, each layer fitted so that the sparse model's stream after it matches the dense model's
(SparseGPT-style, with the mask fixed). `reconstruction=sparse_refit`; on held-out images it beats
oViT alone but loses to block distillation, also as its start (docs/sparsity_reconstruction.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import PrunableViT
from ..pruning.reconstruct import FitResult, _NormalEquations


def masked_lstsq(xtx: Tensor, xty: Tensor, mask: Tensor, current: Tensor, damping: float,
                 bias: bool = True, rows_per_solve: int = 64) -> Tensor:
    """The (in+1, out) ridge solution of `Y ≈ [X 1] W` with every weight where `mask` (out, in) is 0
    held at exactly zero; `current` (in+1, out): the weights (last row: the bias) the ridge pulls
    towards; `bias=False`: the bias is held at zero too. Float64, `rows_per_solve` output rows per
    batched Cholesky solve."""
    n, out = xtx.shape[0] - 1, xty.shape[1]
    if mask.shape != (out, n) or current.shape != (n + 1, out):
        raise ValueError(f"masked_lstsq: mask {tuple(mask.shape)} / current {tuple(current.shape)} do not fit "
                         f"normal equations of {n} inputs and {out} outputs")
    xtx, xty, current = xtx.double(), xty.double(), current.double()
    ridge = damping * xtx.diagonal()[:n].mean().clamp_min(1e-12)
    keep = torch.cat([mask.double(), torch.full((out, 1), float(bias), dtype=torch.float64, device=mask.device)], 1)
    penalty = torch.cat([torch.full((n,), float(ridge), dtype=torch.float64, device=xtx.device),
                         xtx.new_zeros(1)])  # in+1: no ridge on the bias
    solution = torch.zeros_like(xty)
    for start in range(0, out, rows_per_solve):
        m = keep[start:start + rows_per_solve].bool()  # R, in+1
        # each row's free entries first (stable), padded to the chunk's largest support: k x k solves
        k = int(m.sum(1).max())
        idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :k]  # R, k
        free = m.gather(1, idx).double()  # R, k: 0 on the padding
        lhs = xtx[idx[:, :, None], idx[:, None, :]] * free[:, :, None] * free[:, None, :]
        lhs.diagonal(dim1=1, dim2=2).add_(free * penalty[idx] + (1 - free))  # padding: identity, solves to 0
        rhs = free * (xty[:, start:start + rows_per_solve].T.gather(1, idx)
                      + penalty[idx] * current[:, start:start + rows_per_solve].T.gather(1, idx))
        chol, info = torch.linalg.cholesky_ex(lhs)
        if bool(info.any()):  # a singular support (e.g. no damping, too few tokens): the general solver
            w = torch.linalg.lstsq(lhs, rhs[..., None]).solution[..., 0]
        else:
            w = torch.cholesky_solve(rhs[..., None], chol)[..., 0]
        rows = torch.zeros(len(m), n + 1, dtype=torch.float64, device=xtx.device).scatter_(1, idx, w * free)
        solution[:, start:start + rows_per_solve] = rows.T
    return solution


class _MaskedRefit:
    """One sparse linear's refit: normal equations over batches, then the masked per-row solve."""

    def __init__(self, name: str, linear: nn.Linear, scale: Tensor | None = None) -> None:
        self.name, self.linear = name, linear
        self.scale = None if scale is None else scale.detach().double()  # LayerScale gain on the rows
        self.equations = _NormalEquations(linear.in_features, linear.out_features, linear.weight.device)

    def add(self, x: Tensor, y: Tensor) -> None:
        """x: the layer's input (..., in); y: its wanted output (..., out), after LayerScale if any."""
        if self.scale is not None:  # each row is its own regression: fit y / gain, rows of gain 0 alone
            y = torch.where(self.scale != 0, y.double() / self.scale.where(self.scale != 0, 1.0), 0.0)
        self.equations.add(x, y)

    def current(self) -> Tensor:
        w = self.linear.weight.T
        b = self.linear.bias if self.linear.bias is not None else torch.zeros_like(w[0])
        return torch.cat([w, b[None]], 0).double()

    def apply(self, damping: float) -> FitResult:
        current = self.current()
        before = self.equations.error(current)
        solution = masked_lstsq(self.equations.xtx, self.equations.xty, self.linear.weight != 0, current, damping,
                                bias=self.linear.bias is not None)
        after = self.equations.error(solution)
        if not after < before:  # never worse on the fit data than what it had
            return FitResult(self.name, before, before)
        mask = self.linear.weight != 0
        self.linear.weight.copy_((solution[:-1].T * mask).to(self.linear.weight.dtype))
        if self.linear.bias is not None:
            self.linear.bias.copy_(solution[-1].to(self.linear.bias.dtype))
        return FitResult(self.name, before, after)


@torch.no_grad()
def masked_refit(model: PrunableViT, reference: PrunableViT, images: Sequence[Tensor], layers: Sequence[str],
                 sparse: Sequence[str] | Mapping[str, object], target: str = "reference", damping: float = 0.01,
                 device: str | torch.device = "cpu", progress: bool = True) -> list[FitResult]:
    """Refit the sparse linears of the mask-free `model` (their nonzero weights and biases) block by
    block so that it reproduces `reference` on `images` (batches of images); `layers` names which, as
    `conf/reconstruction` does (`qkv`, `proj`, `fc1`, `fc2`), `sparse` the full names of the model's
    sparsified layers (only those are refit). Zeros stay exactly zero. `target="reference"`: each
    layer fitted towards the dense stream (error feedback); `"local"`: the dense layer on our inputs.
    Returns each refit layer's relative error before and after."""
    if model.masked:
        raise ValueError("masked_refit works on a mask-free sparse model (sparsifiers' output)")
    device = torch.device(device)
    model.to(device).eval()
    reference.to(device).eval()
    sparse = set(sparse)
    ref_mask = reference.emb_mask_or_none
    ours = [model.embed(x.to(device).float()) for x in images]
    theirs = [reference.embed(x.to(device).float()) for x in images]
    results: list[FitResult] = []
    for i, (block, ref) in enumerate(tqdm(list(zip(model.blocks, reference.blocks)), desc="masked refit",
                                          leave=False, disable=not progress)):
        for branch, ref_branch in zip(block.branches(), ref.branches()):
            prefix = f"blocks.{i}.{branch.name}"
            normed = [branch.norm(x) for x in ours]
            if branch.reader_option in layers:
                readers = {n: lin for n, (lin, _) in branch.mixer.readers().items() if f"{prefix}.{n}" in sparse}
                ref_readers = ref_branch.mixer.readers()
                fits = {n: _MaskedRefit(f"{prefix}.{n}", lin) for n, lin in readers.items()}
                ref_in = ([ref_branch.norm(x, ref_mask) for x in theirs] if target == "reference" else normed)
                for h, h_ref in zip(normed, ref_in):
                    for n, fit in fits.items():
                        fit.add(h, ref_readers[n][0](h_ref))
                results += [fit.apply(damping) for fit in fits.values()]
            inner = [branch.mixer.inner(h) for h in normed]
            ref_out = [ref_branch(x, ref_mask) for x in theirs]
            writer = branch.mixer.writer()[0]
            if branch.writer_option in layers and f"{prefix}.{branch.writer_option}" in sparse:
                fit = _MaskedRefit(f"{prefix}.{branch.writer_option}", writer, branch.scale)
                for x, o, x_ref, r in zip(ours, inner, theirs, ref_out):
                    fit.add(o, x_ref + r - x if target == "reference" else ref_branch(x, ref_mask))
                results.append(fit.apply(damping))
            ours = [x + branch.write(o) for x, o in zip(ours, inner)]
            theirs = [x + r for x, r in zip(theirs, ref_out)]
    return results
