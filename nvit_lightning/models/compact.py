"""Masked PrunableViT -> physically smaller dense PrunableViT computing the same function, and back:
the weights of a compact model written into the live slices of its masked original."""

from __future__ import annotations

import torch

from .structure import mask_names, param_axes
from .vit import PrunableViT


@torch.no_grad()
def compact_vit(model: PrunableViT) -> PrunableViT:
    """Slice every parameter down to the live units; the result has no masks."""
    if not model.masked:
        raise ValueError("compact() needs a masked model; this one is already compact")
    live = _live_units(model)
    compact = PrunableViT(**{**model.config, "dims": model.live_dims().to_dict(), "masked": False,
                             "pretrained_cfg": model.pretrained_cfg})
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


def _live_units(model: PrunableViT) -> dict:
    buffers = dict(model.named_buffers())
    return {key: buffers[name].nonzero().flatten() for key, name in mask_names(model).items()}


@torch.no_grad()
def load_compact_into(model: PrunableViT, compact: PrunableViT) -> None:
    """The inverse of `compact_vit`: write every parameter of `compact` (a compact copy of the masked
    `model`, e.g. after training it) into the live slices of `model`; pruned slices keep their zeros."""
    if not model.masked or compact.masked:
        raise ValueError("load_compact_into writes a compact (mask-free) model into a masked one")
    if compact.dims != model.live_dims():
        raise ValueError(f"compact dims {compact.dims} differ from the masked model's live dims {model.live_dims()}")
    live = _live_units(model)
    params, new = dict(model.named_parameters()), dict(compact.named_parameters())
    specs = param_axes(model)
    for spec in specs:
        viewed = params[spec.name].data.view(spec.view)
        index = [torch.arange(n, device=viewed.device) for n in spec.view]
        for key, axis in spec.axes.items():
            index[axis] = live[key].to(viewed.device)
        viewed[torch.meshgrid(*index, indexing="ij")] = new[spec.name].reshape([len(i) for i in index])
    unit_owned = {spec.name for spec in specs}
    for name, param in params.items():
        if name not in unit_owned:  # e.g. the classifier bias: no prunable axis
            param.data.copy_(new[name])
