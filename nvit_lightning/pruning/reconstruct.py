"""Closed-form weight reconstruction after structural pruning.

Removing a head, V dims or MLP neurons removes their contribution to the residual stream. The layer
that writes it into the stream (`attn.proj` for heads and V dims, `mlp.fc2` for MLP neurons) can
absorb most of that loss: refit on calibration activations, its kept columns reproduce the
reference model's output as well as a linear map of the kept inputs can (the least-squares
compensation of CORP / OBS-style pruning). Refitting block by block, in order, on the pruned
model's own activations also lets each layer correct the error left by the blocks before it.

With `target="reference"` (the default) every refit layer is fitted so that the pruned model's
residual stream after it matches the reference model's at the same point; with `target="local"` it
reproduces the reference layer on the pruned model's inputs (compensation only, no error feedback).
`q, k, v` and `fc1` (reading the stream) can be refit too, to the reference model's projections of
its own stream; this matters once EMB channels are pruned.

Ridge regression in float64 from accumulated normal equations: `W = (XᵀX + λI)⁻¹ XᵀY` with
`λ = damping · mean(diag XᵀX)`, bias unpenalised. Pruned slices stay zero, so the masked model still
compacts exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import PrunableViT
from .interrupt import Checkpoint, cpu_state, raise_if_stop_requested, stop_requested

if TYPE_CHECKING:
    from .block_distill import BlockDistillation

LAYERS = ("qkv", "proj", "fc1", "fc2")
TARGETS = ("reference", "local")


@dataclass
class FitResult:
    """Relative squared error `‖XW − Y‖² / ‖Y‖²` of one refit layer, before and after."""

    layer: str
    error_before: float
    error_after: float


class _NormalEquations:
    """Accumulates XᵀX, XᵀY, YᵀY (float64) for `Y ≈ X W + b` over token batches."""

    def __init__(self, n_in: int, n_out: int, device: torch.device) -> None:
        self.xtx = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(n_in + 1, n_out, dtype=torch.float64, device=device)
        self.yty = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor, y: Tensor) -> None:
        # float32 products of one batch (a few thousand tokens), summed across batches in float64
        tokens = x.shape[:-1].numel()  # explicit: a removed sub-layer's writer has no inputs (in = 0)
        x = torch.cat([x.reshape(tokens, x.shape[-1]), x.new_ones(tokens, 1)], 1).float()  # T, in+1
        y = y.reshape(tokens, y.shape[-1]).float()  # T, out
        self.xtx += (x.T @ x).double()
        self.xty += (x.T @ y).double()
        self.yty += y.double().square().sum()

    def error(self, w: Tensor) -> float:
        """Relative squared error of the (in+1, out) solution `w` (last row: the bias)."""
        w = w.double()
        sse = (w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum() + self.yty
        return float(sse.clamp_min(0) / self.yty.clamp_min(1e-30))

    def solve(self, damping: float) -> Tensor:
        n = self.xtx.shape[0] - 1
        ridge = damping * self.xtx.diagonal()[:n].mean().clamp_min(1e-12)
        lhs = self.xtx.clone()
        lhs.diagonal()[:n] += ridge
        return torch.linalg.solve(lhs, self.xty)  # in+1, out


class _Refit:
    """One linear layer's refit: accumulate (input, target) over batches, then solve and write the
    live block of its weight and bias. With `scale` (a LayerScale gain after the layer) the fit is
    of the scaled output `scale ⊙ (x W + b)`, in residual-stream units, and the solution is divided
    back; rows whose gain is zero contribute nothing and are left alone."""

    def __init__(self, name: str, linear: nn.Linear, rows: Tensor, cols: Tensor, scale: Tensor | None = None) -> None:
        if scale is not None:
            rows = rows[scale[rows] != 0]
        self.name, self.linear, self.rows, self.cols = name, linear, rows, cols
        self.scale = None if scale is None else scale.detach()[rows].double()
        self.equations = _NormalEquations(len(cols), len(rows), linear.weight.device)

    def add(self, x: Tensor, y: Tensor) -> None:
        """x: the layer's full input (..., in); y: the wanted full (scaled) output (..., out)."""
        self.equations.add(x[..., self.cols], y[..., self.rows])

    def current(self) -> Tensor:
        w = self.linear.weight[self.rows][:, self.cols].T  # in, out
        b = self.linear.bias[self.rows] if self.linear.bias is not None else torch.zeros_like(w[0])
        wb = torch.cat([w, b[None]], 0).double()
        return wb if self.scale is None else wb * self.scale

    def apply(self, damping: float) -> FitResult:
        before = self.equations.error(self.current())
        solution = self.equations.solve(damping)
        after = self.equations.error(solution)
        if not after < before:  # the ridge never makes it worse on the fit data; keep the old weights
            return FitResult(self.name, before, before)
        if self.scale is not None:
            solution = solution / self.scale
        weight = self.linear.weight
        rows, cols = self.rows[:, None], self.cols[None, :]
        weight[rows, cols] = solution[:-1].T.to(weight.dtype)
        if self.linear.bias is not None:
            self.linear.bias[self.rows] = solution[-1].to(weight.dtype)
        return FitResult(self.name, before, after)


@torch.no_grad()
def reconstruct(model: PrunableViT, reference: PrunableViT, images: Iterable[Tensor | Sequence[Tensor]],
                layers: Sequence[str] = ("proj", "fc2"), target: str = "reference", damping: float = 0.01,
                device: str | torch.device = "cpu", progress: bool = True,
                checkpoint: Checkpoint | None = None) -> list[FitResult]:
    """Refit `layers` of the masked `model` block by block so that it reproduces `reference` (the
    model before pruning, same weights layout) on `images` (tensors, or (images, labels) batches).

    Each block's plan is its `branches()`: per residual branch, the layers reading the normed stream
    (`qkv` / `fc1`), then the one writing into it (`proj` / `fc2`, through LayerScale if any).
    Returns the relative error of every refit layer before and after its refit.

    With `checkpoint`, a stop requested (`interrupt.py`) takes effect after the current block, its
    state saved there (and at the end); a call with a saved state goes on from the next block, the
    streams of the blocks done recomputed from their saved weights.
    """
    _check_options(layers, target, damping)
    if not model.masked:
        raise ValueError("reconstruct works on the masked model (before compact())")
    device = torch.device(device)
    model.to(device).eval()
    reference.to(device).eval()
    batches = [x.to(device) for x in image_batches(images)]
    if not batches:
        raise ValueError("reconstruct needs at least one calibration batch")
    emb_mask, ref_mask = model.emb_mask, reference.emb_mask_or_none
    emb = model.emb_mask.nonzero().flatten()
    checkpoint = checkpoint or Checkpoint(None)
    start, results = _resume_refit(model, checkpoint.load())
    n_blocks = len(model.blocks)
    if start == n_blocks:
        return results
    ours = [model.embed(x.float()) for x in batches]  # the pruned model's residual stream
    theirs = [reference.embed(x.float()) for x in batches]  # the reference model's
    for i, (block, ref) in enumerate(tqdm(list(zip(model.blocks, reference.blocks)), desc="reconstruct",
                                          leave=False, disable=not progress)):
        fit_now = i >= start  # the blocks before `start` only carry the streams
        for branch, ref_branch in zip(block.branches(), ref.branches()):
            name = f"blocks.{i}.{branch.name}"
            normed = [branch.norm(x, emb_mask) for x in ours]
            if fit_now and branch.reader_option in layers:  # q, k, v / fc1: the reference's projections of its stream
                ref_readers = ref_branch.mixer.readers()
                fits = {n: _Refit(f"{name}.{n}", linear, rows, emb)  # none for a removed sub-layer
                        for n, (linear, rows) in branch.mixer.readers().items() if len(rows)}
                ref_in = [ref_branch.norm(x, ref_mask) for x in theirs] if target == "reference" else normed
                for h, h_ref in zip(normed, ref_in):
                    for n, fit in fits.items():
                        fit.add(h, ref_readers[n][0](h_ref))
                results += [fit.apply(damping) for fit in fits.values()]
            inner = [branch.mixer.inner(h) for h in normed]  # heads' outputs / hidden activations
            ref_out = [ref_branch(x, ref_mask) for x in theirs]
            if fit_now and branch.writer_option in layers:  # proj / fc2: what the branch should add to the stream
                writer, cols = branch.mixer.writer()
                fit = _Refit(f"{name}.{branch.writer_option}", writer, emb, cols, branch.scale)
                for x, o, x_ref, r in zip(ours, inner, theirs, ref_out):
                    fit.add(o, x_ref + r - x if target == "reference" else ref_branch(x, ref_mask))
                results.append(fit.apply(damping))
            ours = [x + branch.write(o, emb_mask) for x, o in zip(ours, inner)]
            theirs = [x + r for x, r in zip(theirs, ref_out)]
        if fit_now and checkpoint.active:  # saved when stopping here (and at the end), then stopped if asked
            if stop_requested() or i == n_blocks - 1:
                checkpoint.save({"blocks_done": i + 1, "model": cpu_state(model),
                                 "results": [asdict(r) for r in results]})
            raise_if_stop_requested(f"block {i + 1} of {n_blocks} of the least-squares refit")
    return results


def _resume_refit(model: PrunableViT, saved: dict | None) -> tuple[int, list[FitResult]]:
    """The blocks done and their results by a saved refit (its weights loaded into `model`)."""
    if saved is None:
        return 0, []
    model.load_state_dict(saved["model"])
    return saved["blocks_done"], [FitResult(**r) for r in saved["results"]]


def image_batches(batches: Iterable[Tensor | Sequence[Tensor]]) -> list[Tensor]:
    """The images of calibration batches given as tensors or as (images, labels) pairs."""
    return [b[0] if isinstance(b, list | tuple) else b for b in batches]


def _check_options(layers: Sequence[str], target: str, damping: float) -> None:
    unknown = set(layers) - set(LAYERS)
    if unknown:
        raise ValueError(f"reconstruction.layers: unknown {sorted(unknown)}; choose from {LAYERS}")
    if target not in TARGETS:
        raise ValueError(f"reconstruction.target must be one of {TARGETS}, got {target!r}")
    if not damping > 0:
        raise ValueError(f"reconstruction.damping must be > 0, got {damping}")


@dataclass(frozen=True)
class Reconstruction:
    """`reconstruct` with its options fixed, as configured (`conf/reconstruction/`): refit `layers`
    on `batches` calibration batches, then, with `distillation`, train each block on the same
    batches to reproduce the dense model's (`block_distill.py`)."""

    layers: Sequence[str] = ("proj", "fc2")
    target: str = "reference"
    damping: float = 0.01
    batches: int = 8
    distillation: BlockDistillation | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        _check_options(self.layers, self.target, self.damping)
        if self.batches < 1:
            raise ValueError(f"reconstruction.batches must be >= 1, got {self.batches}")

    def __call__(self, model: PrunableViT, reference: PrunableViT, batches: Sequence[Tensor | Sequence[Tensor]],
                 device: str | torch.device = "cpu", progress: bool = True,
                 checkpoint: Checkpoint | None = None) -> list[FitResult]:
        """Refit `model` in place. With `checkpoint`, each part stops after its current block when a stop
        is requested, saved beside it (`<stem>.least_squares.pt`, `<stem>.distillation.pt`), and goes on
        from there when called again."""
        checkpoint = checkpoint or Checkpoint(None)
        batches = list(batches)[: self.batches]
        results = reconstruct(model, reference, batches, self.layers, self.target, self.damping, device, progress,
                              checkpoint.part("least_squares"))
        if self.distillation is not None:
            results += self.distillation(model, reference, image_batches(batches), device, progress,
                                         checkpoint=checkpoint.part("distillation"))
        return results
