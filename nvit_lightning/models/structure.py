"""Which slice of which parameter belongs to which prunable unit: the single description of a
PrunableViT's structure that compaction, saliency, pruning and sizes all read.

`KIND_SPECS` declares the five kinds of units once (mask buffer, ViTDims field, NViT's default group
size and saliency divisor); `param_axes` lists every parameter slice each unit owns, for every
feature a model has (register tokens, LayerScale gammas, qk_norm, fc_norm, ...).

A *layer* is one set of same-kind units: ("emb", -1) is the residual-stream width shared by every
block; ("head" | "qk" | "v" | "mlp", i) are the units of block i. QK and V units are aligned across
heads: QK unit j is dimension j of the queries and keys of every head of the block (and, with
qk_norm, channel j of the block's q/k LayerNorms, whose statistics run over live QK units only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from .dims import ViTDims


@dataclass(frozen=True)
class Gate:
    """Where a kind's units can be gated (multiplied by a per-unit factor whose derivative is their
    saliency): the input (`pre`) or output of a block's `layer`, whose last axis is viewed as (heads,
    per-head width) when `split` names those attributes of the block's attention; `axis` of that view
    (or the whole last axis) indexes the units."""

    layer: str  # relative to the block
    pre: bool
    split: tuple[str, str] | None = None
    axis: int = 0


@dataclass(frozen=True)
class KindSpec:
    """One kind of prunable unit: where its mask lives, which ViTDims field counts it (and so which
    column of a latency-table row), NViT's defaults for it (units pruned together, the saliency
    divisor c_kind), and where its saliency gate sits (EMB has none of its own: the residual stream
    is gated on every write into it)."""

    name: str
    mask: str  # the mask buffer: of the model (EMB), or of each block, relative to the block
    dims_field: str
    group_size: int
    divisor: float
    gate: Gate | None = None

    @property
    def per_block(self) -> bool:
        return self.name != "emb"


_HEADS_V = ("num_heads", "v_dim")
KIND_SPECS = (
    KindSpec("emb", "emb_mask", "emb", 16, 12.0),
    KindSpec("head", "attn.head_mask", "heads", 2, 12.0, Gate("attn.proj", pre=True, split=_HEADS_V, axis=0)),
    KindSpec("qk", "attn.qk_mask", "qk", 8, 2.0, Gate("attn.q", pre=False, split=("num_heads", "qk_dim"), axis=1)),
    KindSpec("v", "attn.v_mask", "v", 8, 2.0, Gate("attn.proj", pre=True, split=_HEADS_V, axis=1)),
    KindSpec("mlp", "mlp.mask", "mlp", 16, 1.0, Gate("mlp.fc2", pre=True)),
)
KINDS = tuple(k.name for k in KIND_SPECS)
DEFAULT_GROUP_SIZES = {k.name: k.group_size for k in KIND_SPECS}
DEFAULT_DIVISORS = {k.name: k.divisor for k in KIND_SPECS}
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

    def numel(self, sizes: dict[LayerKey, int]) -> int:
        """The parameter's size once each of its layers has `sizes[key]` units."""
        view = list(self.view)
        for key, axis in self.axes.items():
            view[axis] = sizes[key]
        return math.prod(view)


def param_axes(model) -> list[ParamAxes]:
    """Every parameter slice owned by a prunable unit of `model`."""
    e = model.dims.emb
    out: list[ParamAxes] = []

    def add(name: str, factors: tuple[tuple[int, ...], ...], **axes: int) -> None:
        out.append(ParamAxes(name, factors, {_key(k): a for k, a in axes.items()}))

    def add_norm(name: str, norm: nn.Module, **axes: int) -> None:  # NoNorm has no parameters
        if isinstance(norm, nn.LayerNorm):
            size = norm.normalized_shape[0]
            add(f"{name}.weight", ((size,),), **axes)
            add(f"{name}.bias", ((size,),), **axes)

    pe = model.patch_embed.proj
    add("patch_embed.proj.weight", ((e,), *((d,) for d in pe.weight.shape[1:])), emb=0)
    if pe.bias is not None:
        add("patch_embed.proj.bias", ((e,),), emb=0)
    for token in ("cls_token", "dist_token", "reg_token"):
        if getattr(model, token) is not None:
            add(token, ((1,), (getattr(model, token).shape[1],), (e,)), emb=2)
    add("pos_embed", ((1,), (model.pos_embed.shape[1],), (e,)), emb=2)
    add_norm("norm_pre", model.norm_pre, emb=0)
    for i, block in enumerate(model.blocks):
        a = block.attn
        h, qk, v, m = a.num_heads, a.qk_dim, a.v_dim, block.mlp.fc1.out_features
        p = f"blocks.{i}."
        add_norm(p + "norm1", block.norm1, emb=0)
        add_norm(p + "norm2", block.norm2, emb=0)
        for proj in ("q", "k"):
            add(p + f"attn.{proj}.weight", ((h, qk), (e,)), **{f"head_{i}": 0, f"qk_{i}": 1, "emb": 2})
            if a.q.bias is not None:
                add(p + f"attn.{proj}.bias", ((h, qk),), **{f"head_{i}": 0, f"qk_{i}": 1})
            add_norm(p + f"attn.{proj}_norm", getattr(a, f"{proj}_norm"), **{f"qk_{i}": 0})
        add(p + "attn.v.weight", ((h, v), (e,)), **{f"head_{i}": 0, f"v_{i}": 1, "emb": 2})
        if a.v.bias is not None:
            add(p + "attn.v.bias", ((h, v),), **{f"head_{i}": 0, f"v_{i}": 1})
        add(p + "attn.proj.weight", ((e,), (h, v)), **{"emb": 0, f"head_{i}": 1, f"v_{i}": 2})
        add(p + "attn.proj.bias", ((e,),), emb=0)
        add(p + "mlp.fc1.weight", ((m,), (e,)), **{f"mlp_{i}": 0, "emb": 1})
        add(p + "mlp.fc1.bias", ((m,),), **{f"mlp_{i}": 0})
        add(p + "mlp.fc2.weight", ((e,), (m,)), **{"emb": 0, f"mlp_{i}": 1})
        add(p + "mlp.fc2.bias", ((e,),), emb=0)
        for ls in ("ls1", "ls2"):  # LayerScale: one gain per residual channel
            if hasattr(getattr(block, ls), "gamma"):
                add(p + f"{ls}.gamma", ((e,),), emb=0)
    add_norm("norm", model.norm, emb=0)
    add_norm("fc_norm", model.fc_norm, emb=0)
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head), nn.Linear):
            add(f"{head}.weight", ((model.num_classes,), (e,)), emb=1)
    return out


def mask_names(model) -> dict[LayerKey, str]:
    """The mask buffer of every layer of a masked PrunableViT, in `KIND_SPECS` order per block."""
    names = {EMB: KIND_SPECS[0].mask}
    for i in range(len(model.blocks)):
        names.update({(k.name, i): f"blocks.{i}.{k.mask}" for k in KIND_SPECS if k.per_block})
    return names


def live_dims(model) -> ViTDims:
    """The dims of a masked model once its masked units are removed."""
    buffers = dict(model.named_buffers())
    fields: dict[str, list[int]] = {k.dims_field: [] for k in KIND_SPECS}
    for (kind, _), name in mask_names(model).items():
        fields[_SPECS[kind].dims_field].append(int(buffers[name].count_nonzero()))
    return ViTDims(**{f: (v[0] if f == "emb" else v) for f, v in fields.items()})


def layer_sizes(model, dims: ViTDims) -> dict[LayerKey, int]:
    """The number of units of every layer of a model with `dims`."""
    sizes = {EMB: dims.emb}
    for i in range(dims.depth):
        sizes.update({(k.name, i): getattr(dims, k.dims_field)[i] for k in KIND_SPECS if k.per_block})
    return sizes


def compact_num_params(model, dims: ViTDims | None = None) -> int:
    """Parameters of `model` once every layer is cut to `dims` (default: its live dims), counted
    from the structure itself, so every feature (tokens, norms, LayerScale) is included."""
    sizes = layer_sizes(model, dims or model.live_dims())
    owned = {spec.name: spec.numel(sizes) for spec in param_axes(model)}
    return sum(owned.get(name, p.numel()) for name, p in model.named_parameters())


_SPECS = {k.name: k for k in KIND_SPECS}


def _key(name: str) -> LayerKey:
    if name == "emb":
        return EMB
    kind, block = name.rsplit("_", 1)
    return kind, int(block)
