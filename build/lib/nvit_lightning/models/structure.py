"""Which slice of which parameter belongs to which prunable unit: the single description of a
PrunableViT's structure that compaction, saliency and pruning all read.

A *layer* is one set of same-kind units: ("emb", -1) is the residual-stream width shared by every
block; ("head" | "qk" | "v" | "mlp", i) are the units of block i. QK and V units are aligned across
heads: QK unit j is dimension j of the queries and keys of every head of the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

KINDS = ("emb", "head", "qk", "v", "mlp")
EMB = ("emb", -1)
LayerKey = tuple[str, int]


@dataclass(frozen=True)
class ParamAxes:
    """A parameter viewed as a tensor of structural factors, and which factor indexes which layer.

    E.g. block i's `attn.q.weight` of shape (H*qk, emb) has factors ((H, qk), (emb,)), i.e. the view
    (H, qk, emb), with ("head", i) on axis 0, ("qk", i) on axis 1 and EMB on axis 2.
    """

    name: str
    factors: tuple[tuple[int, ...], ...]
    axes: dict[LayerKey, int]

    @property
    def view(self) -> tuple[int, ...]:
        return tuple(f for group in self.factors for f in group)

    def unview(self, viewed: Tensor) -> Tensor:
        """Back to the parameter's layout after some factors were sliced."""
        shape, axis = [], 0
        for group in self.factors:
            shape.append(math.prod(viewed.shape[axis:axis + len(group)]))
            axis += len(group)
        return viewed.reshape(shape)

    def unit_sums(self, values: Tensor, key: LayerKey) -> Tensor:
        """Sum `values` (same shape as the parameter) over everything but `key`'s unit axis."""
        viewed = values.reshape(self.view)
        other = [d for d in range(viewed.dim()) if d != self.axes[key]]
        return viewed.sum(dim=other) if other else viewed  # sum(dim=[]) would reduce everything


def param_axes(model) -> list[ParamAxes]:
    """Every parameter slice owned by a prunable unit of `model`."""
    e = model.dims.emb
    out: list[ParamAxes] = []

    def add(name: str, factors: tuple[tuple[int, ...], ...], **axes: int) -> None:
        out.append(ParamAxes(name, factors, {_key(k): a for k, a in axes.items()}))

    pe = model.patch_embed.proj.weight
    add("patch_embed.proj.weight", ((e,), *((d,) for d in pe.shape[1:])), emb=0)
    add("patch_embed.proj.bias", ((e,),), emb=0)
    add("cls_token", ((1,), (1,), (e,)), emb=2)
    if model.dist_token is not None:
        add("dist_token", ((1,), (1,), (e,)), emb=2)
    add("pos_embed", ((1,), (model.pos_embed.shape[1],), (e,)), emb=2)
    for i, block in enumerate(model.blocks):
        a = block.attn
        h, qk, v, m = a.num_heads, a.qk_dim, a.v_dim, block.mlp.fc1.out_features
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            add(p + f"{norm}.weight", ((e,),), emb=0)
            add(p + f"{norm}.bias", ((e,),), emb=0)
        for proj in ("q", "k"):
            add(p + f"attn.{proj}.weight", ((h, qk), (e,)), **{f"head_{i}": 0, f"qk_{i}": 1, "emb": 2})
            if a.q.bias is not None:
                add(p + f"attn.{proj}.bias", ((h, qk),), **{f"head_{i}": 0, f"qk_{i}": 1})
        add(p + "attn.v.weight", ((h, v), (e,)), **{f"head_{i}": 0, f"v_{i}": 1, "emb": 2})
        if a.v.bias is not None:
            add(p + "attn.v.bias", ((h, v),), **{f"head_{i}": 0, f"v_{i}": 1})
        add(p + "attn.proj.weight", ((e,), (h, v)), **{"emb": 0, f"head_{i}": 1, f"v_{i}": 2})
        add(p + "attn.proj.bias", ((e,),), emb=0)
        add(p + "mlp.fc1.weight", ((m,), (e,)), **{f"mlp_{i}": 0, "emb": 1})
        add(p + "mlp.fc1.bias", ((m,),), **{f"mlp_{i}": 0})
        add(p + "mlp.fc2.weight", ((e,), (m,)), **{"emb": 0, f"mlp_{i}": 1})
        add(p + "mlp.fc2.bias", ((e,),), emb=0)
    add("norm.weight", ((e,),), emb=0)
    add("norm.bias", ((e,),), emb=0)
    add("head.weight", ((model.num_classes,), (e,)), emb=1)
    if model.head_dist is not None:
        add("head_dist.weight", ((model.num_classes,), (e,)), emb=1)
    return out


def mask_names(model) -> dict[LayerKey, str]:
    """The mask buffer of every layer of a masked PrunableViT."""
    names = {EMB: "emb_mask"}
    for i in range(len(model.blocks)):
        names[("head", i)] = f"blocks.{i}.attn.head_mask"
        names[("qk", i)] = f"blocks.{i}.attn.qk_mask"
        names[("v", i)] = f"blocks.{i}.attn.v_mask"
        names[("mlp", i)] = f"blocks.{i}.mlp.mask"
    return names


def _key(name: str) -> LayerKey:
    if name == "emb":
        return EMB
    kind, block = name.rsplit("_", 1)
    return kind, int(block)
