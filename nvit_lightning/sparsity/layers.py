"""Which weights are sparsified, and their view as rows of `block_size` consecutive weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")


def sparsifiable_layers(model: nn.Module, patch_embed: bool = False, head: bool = False) -> dict[str, nn.Module]:
    """The linears of every transformer block (q, k, v, proj, fc1, fc2), plus optionally the patch
    embedding (a convolution with stride = kernel, i.e. a linear over patches) and the classifier."""
    modules = dict(model.named_modules())
    layers = {name: m for name, m in modules.items()
              if name.startswith("blocks.") and name.split(".", 2)[-1] in BLOCK_LINEARS}
    if patch_embed:
        layers["patch_embed.proj"] = modules["patch_embed.proj"]
    if head:
        layers.update({name: modules[name] for name in ("head", "head_dist") if modules.get(name) is not None})
    if not layers:
        raise ValueError("the model has no sparsifiable layers (expected blocks.<i>.attn/mlp linears)")
    return layers


def layer_sparsity(model: nn.Module, names: list[str]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros over the named layers' weights together, and in each of them."""
    modules = dict(model.named_modules())
    zeros = {name: int((modules[name].weight == 0).sum()) for name in names}
    sizes = {name: modules[name].weight.numel() for name in names}
    return sum(zeros.values()) / sum(sizes.values()), {name: zeros[name] / sizes[name] for name in names}


def weight_masks(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """`{"<layer>.weight": 1 where the weight is nonzero}` of the named layers: the zeros a sparse
    model's reconstruction or fine-tuning must hold (`BlockDistillation(masks=...)`)."""
    modules = dict(model.named_modules())
    return {f"{name}.weight": (modules[name].weight != 0).to(modules[name].weight.dtype).detach() for name in names}


def layer_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """What the layer's weight (flattened to out x in) multiplies, per sample: (B, tokens, in)."""
    if isinstance(layer, nn.Conv2d):  # patch embedding: one token per non-overlapping patch
        return F.unfold(x, layer.kernel_size, stride=layer.stride).transpose(1, 2)  # B, N, C*k*k
    return x if x.dim() == 3 else x.unsqueeze(1)


@dataclass(frozen=True)
class Blocks:
    """A weight of `numel` entries, flattened row-major (out, in) and cut into `rows` blocks of
    `size`; the last block is padded with `pad` entries that are never real weights."""

    numel: int
    size: int

    @property
    def rows(self) -> int:
        return -(-self.numel // self.size)

    @property
    def pad(self) -> int:
        return self.rows * self.size - self.numel

    def view(self, weight: Tensor) -> Tensor:
        """(rows, size) float copy of the flattened weight, zero-padded."""
        flat = weight.detach().reshape(-1).float()
        return F.pad(flat, (0, self.pad)).view(self.rows, self.size)

    def padding_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """(rows, size) True on the padded entries."""
        mask = torch.zeros(self.rows * self.size, dtype=torch.bool, device=device)
        mask[self.numel:] = True
        return mask.view(self.rows, self.size)

    def unview(self, blocks: Tensor, like: Tensor) -> Tensor:
        return blocks.reshape(-1)[: self.numel].view_as(like).to(like.dtype)
