"""The empirical Fisher of blocks of weights, from per-sample gradients on calibration images.

For each sparsified layer, F_b = (1/m) Σ_i g_i,b g_i,bᵀ over m per-sample gradients g_i restricted to
block b (`block_size` consecutive weights of the flattened weight). The per-sample gradient of a
linear is Σ_tokens δ xᵀ: captured with hooks from the layer's input and output gradient, so one
batched backward yields a batch of per-sample gradients without storing them all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .layers import Blocks, layer_inputs

log = logging.getLogger("nvit_lightning")


def block_fisher(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
                 num_grads: int, block_size: int, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """(rows, block_size, block_size) empirical Fisher blocks of each layer's weight from the first
    `num_grads` samples of `batches` (cross-entropy on their labels, one gradient per image)."""
    model = model.to(device).eval()
    blocks = {name: Blocks(layer.weight.numel(), block_size) for name, layer in layers.items()}
    fisher = {name: torch.zeros(b.rows, block_size, block_size, device=device) for name, b in blocks.items()}
    inputs: dict[str, Tensor] = {}

    def save_input(name: str):
        def hook(layer: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs[name] = layer_inputs(layer, args[0].detach())
        return hook

    def accumulate(name: str):
        def hook(layer: nn.Module, grad_input: tuple, grad_output: tuple[Tensor, ...]) -> None:
            delta = grad_output[0]
            delta = delta.flatten(2).transpose(1, 2) if delta.dim() == 4 else delta  # conv: B, N, out
            delta = delta if delta.dim() == 3 else delta.unsqueeze(1)
            grads = torch.einsum("bno,bni->boi", delta.float(), inputs.pop(name).float())  # B, out, in
            b = blocks[name]
            g = F.pad(grads.reshape(len(grads), -1), (0, b.pad)).view(len(grads), b.rows, b.size)
            fisher[name].add_(torch.einsum("bki,bkj->kij", g, g))
        return hook

    handles = [h for name, layer in layers.items() for h in (
        layer.register_forward_pre_hook(save_input(name)), layer.register_full_backward_hook(accumulate(name)))]
    try:
        seen = 0
        with tqdm(total=num_grads, desc="fisher (per-sample gradients)", leave=False) as bar:
            for images, labels in _take(batches, num_grads):
                model.zero_grad(set_to_none=True)
                # summed, not averaged: each sample's gradient is then its own loss's gradient
                images = images.to(device).requires_grad_(True)  # so that hooks on the first layer fire too
                F.cross_entropy(model(images), labels.to(device), reduction="sum").backward()
                seen += len(labels)
                bar.update(len(labels))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("no calibration images for the Fisher: the data has no training samples")
    if seen < num_grads:
        log.warning(f"Fisher from {seen} per-sample gradients, not num_grads={num_grads}: the calibration "
                    f"data has only {seen} images")
    return {name: f.div_(seen) for name, f in fisher.items()}


def _take(batches: Iterable[tuple[Tensor, Tensor]], num: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches until `num` samples, the last one cut to size."""
    left = num
    for images, labels in batches:
        if left <= 0:
            return
        yield images[:left], labels[:left]
        left -= len(labels)


def damped_inverse(fisher: Tensor, damp: float) -> Tensor:
    """(F + λI)⁻¹ per block, λ = `damp` x the mean diagonal of the layer's Fisher (relative, so one
    value serves every layer and loss scale), in float64 for the inversion."""
    diag = fisher.diagonal(dim1=-2, dim2=-1)
    lam = damp * diag.mean().clamp_min(torch.finfo(torch.float32).tiny)
    damped = fisher.double() + lam.double() * torch.eye(fisher.shape[-1], dtype=torch.float64, device=fisher.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(damped)).float()
