"""Masked PrunableViT -> physically smaller dense PrunableViT computing the same function."""

from __future__ import annotations

import torch

from .structure import mask_names, param_axes
from .vit import PrunableViT


@torch.no_grad()
def compact_vit(model: PrunableViT) -> PrunableViT:
    """Slice every parameter down to the live units; the result has no masks."""
    if not model.masked:
        raise ValueError("compact() needs a masked model; this one is already compact")
    buffers = dict(model.named_buffers())
    live = {key: buffers[name].nonzero().flatten() for key, name in mask_names(model).items()}
    compact = PrunableViT(**{**model.config, "dims": model.live_dims().to_dict(), "masked": False})
    compact.train(model.training)

    sliced = {}
    params = dict(model.named_parameters())
    for spec in param_axes(model):
        viewed = params[spec.name].detach().reshape(spec.view)
        for key, axis in spec.axes.items():
            viewed = viewed.index_select(axis, live[key])
        sliced[spec.name] = spec.unview(viewed)
    state = {k: sliced.get(k, v) for k, v in model.state_dict().items() if not k.endswith("mask")}
    compact.load_state_dict(state, strict=True)
    return compact.to(next(model.parameters()).device)
