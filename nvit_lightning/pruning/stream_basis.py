"""An exact change of basis of the residual stream, after which narrowing it (EMB pruning: keeping its
leading channels) keeps the stream's principal directions instead of arbitrary channels.

Every reader of the stream goes through a LayerNorm, and a LayerNorm without gain and bias commutes
with any orthogonal map that fixes the all-ones direction. So, in order (each step leaves the model's
function unchanged):

1. fold each LayerScale gain into the writer before it (`attn.proj`, `mlp.fc2`);
2. centre every writer (patch embedding, tokens, position embedding, `proj`, `fc2`): the readers'
   LayerNorms subtract the mean over channels anyway, so the stream may as well have none;
3. fold each reading LayerNorm's gain and bias into the linears after it (q / k / v, fc1, the
   classifier heads), leaving it with gain 1 and bias 0;
4. rotate the stream by an orthogonal Q (writers W <- Q W, readers W <- W Qᵀ).

Q is `H Pᵀ`: P holds the principal directions of the token-normalised stream (x / ‖x‖, what the
LayerNorms see) entering the blocks and the final norm on calibration images, after the all-ones
direction; H is the Helmert basis, whose column k (k >= 1) is supported on channels 0..k with zero
sum. So for every width n the n - 1 leading principal directions span exactly the vectors on
channels 0..n-1 with zero sum over them, and every other direction is constant on those channels,
which the masked LayerNorm's centring over the live channels removes. Narrowing to n channels
(`narrow_stream`) then projects the stream onto its n - 1 leading principal directions; with the
LayerNorm gains scaled by sqrt(d / n) (the variance runs over n live channels instead of d), a model
whose stream lies in an (n - 1)-dim subspace is reproduced exactly (up to the LayerNorms' eps).

The rotated model is a plain PrunableViT (same shapes, LayerNorm gains of 1), so masks, compaction,
the refit and the block distillation work on it as on any other.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import EMB, KINDS, PrunableViT
from ..models.vit import LayerScale, MaskedLayerNorm
from .groups import Structure


def check_rotatable(model: PrunableViT) -> None:
    """Refuse a model whose stream has a reader or writer the change of basis cannot go through."""
    if model.config.get("pre_norm", False):
        raise ValueError("the residual stream of a pre_norm model (CLIP) is written by a LayerNorm (norm_pre), "
                         "whose per-channel gain does not commute with a rotation: EMB cannot be searched")
    if model.global_pool in ("max", "avgmax"):
        raise ValueError(f"global_pool={model.global_pool!r} takes a per-channel max of the stream, which a "
                         f"rotation changes: EMB can be searched with token or avg pooling only")
    if not isinstance(model.head, nn.Linear):
        raise ValueError("the model has no classifier (num_classes=0): its features are the stream itself, "
                         "which a change of basis would change")
    if model.masked and int(model.emb_mask.count_nonzero()) != model.dims.emb:
        raise ValueError("EMB is already pruned: the change of basis needs every stream channel live")


def stream_writers(model: PrunableViT) -> list[tuple[Tensor, int]]:
    """Every parameter that writes into the stream, with its stream (EMB) axis."""
    out = [(model.patch_embed.proj.weight, 0), (model.pos_embed, -1)]  # (e, c, p, p), (1, tokens, e)
    if model.patch_embed.proj.bias is not None:
        out.append((model.patch_embed.proj.bias, 0))
    out += [(t, -1) for t in (model.cls_token, model.dist_token, model.reg_token) if t is not None]  # (1, n, e)
    for block in model.blocks:
        for layer in (block.attn.proj, block.mlp.fc2):  # (e, in), (e,)
            out += [(layer.weight, 0), (layer.bias, 0)]
    return out


def _heads(model: PrunableViT) -> list[nn.Linear]:
    return [model.head] + ([model.head_dist] if model.head_dist is not None else [])


def _readers(model: PrunableViT) -> list[tuple[MaskedLayerNorm, list[nn.Linear]]]:
    """Every LayerNorm reading the stream, with the linears reading its output (all in (out, e))."""
    out = []
    for block in model.blocks:
        out += [(block.norm1, [block.attn.q, block.attn.k, block.attn.v]), (block.norm2, [block.mlp.fc1])]
    for norm in (model.norm, model.fc_norm):  # one of them is a LayerNorm, the other NoNorm
        if isinstance(norm, MaskedLayerNorm):
            out.append((norm, _heads(model)))
    return out


def _along(t: Tensor, axis: int, matrix: Tensor) -> None:
    """t <- matrix applied to t's `axis` (vectors along it), in float64, in place."""
    moved = t.data.double().movedim(axis, -1)
    t.data.copy_((moved @ matrix.T).movedim(-1, axis).to(t.dtype))


@torch.no_grad()
def fold_layer_scales(model: PrunableViT) -> None:
    """x + γ ⊙ (W h + b) = x + (diag(γ) W) h + γ ⊙ b: the gains go into the writers, then are 1."""
    for block in model.blocks:
        for scale, layer in ((block.ls1, block.attn.proj), (block.ls2, block.mlp.fc2)):
            if isinstance(scale, LayerScale):
                layer.weight.mul_(scale.gamma[:, None])  # (e, in)
                layer.bias.mul_(scale.gamma)
                scale.gamma.fill_(1.0)


@torch.no_grad()
def centre_writers(model: PrunableViT) -> None:
    """W <- (I - 11ᵀ/d) W for every writer: the stream keeps zero mean over its channels."""
    for t, axis in stream_writers(model):
        t.sub_(t.mean(dim=axis, keepdim=True))


@torch.no_grad()
def fold_norms(model: PrunableViT) -> None:
    """W (γ ⊙ n + β) + b = (W diag(γ)) n + (W β + b): each reading LayerNorm's gain and bias go into
    the linears after it, and the norm is left with gain 1, bias 0."""
    for norm, layers in _readers(model):
        gain, shift = norm.weight.double(), norm.bias.double()
        for layer in layers:
            w = layer.weight.double()  # out, e
            if layer.bias is None:
                raise ValueError(f"a linear reading the stream without a bias cannot take the LayerNorm bias "
                                 f"({type(layer).__name__} of shape {tuple(layer.weight.shape)})")
            layer.bias.copy_((layer.bias.double() + w @ shift).to(layer.bias.dtype))
            layer.weight.copy_((w * gain).to(layer.weight.dtype))
        norm.weight.fill_(1.0)
        norm.bias.zero_()


@torch.no_grad()
def stream_statistics(model: PrunableViT, images: Iterable[Tensor], device: str | torch.device = "cpu"
                      ) -> tuple[Tensor, Tensor]:
    """Per image, two (e, e) float64 second moments of a model with centred writers: Σ x̂ x̂ᵀ over the
    tokens of the stream entering every block and the final norm, x̂ = x / ‖x‖ (what a LayerNorm
    reads); and Σ w wᵀ over the tokens of what every writer adds to the stream (the embedding, each
    attention and MLP branch)."""
    device = torch.device(device)
    model.to(device).eval()
    mask = model.emb_mask_or_none
    e = model.dims.emb
    moments, written = (torch.zeros(e, e, dtype=torch.float64, device=device) for _ in range(2))
    count = 0

    def add(x: Tensor) -> None:
        x = x.flatten(0, -2).double()  # tokens, e
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        moments.add_(x.T @ x)

    def write(w: Tensor) -> None:
        w = w.flatten(0, -2).double()
        written.add_(w.T @ w)

    for batch in images:
        x = model.embed(batch.to(device).float())  # B, tokens, e
        write(x)
        count += len(batch)
        for block in model.blocks:
            add(x)
            for branch in block.branches():  # Block.forward, branch by branch (eval: no drop path)
                w = branch(x, mask)
                write(w)
                x = x + w
        add(x)
    if not count:
        raise ValueError("the stream's principal directions need at least one calibration batch")
    return (moments / count).cpu(), (written / count).cpu()


def helmert(d: int) -> Tensor:
    """(d, d) float64 orthonormal: column 0 is 1/√d; column k >= 1 is (1, ..., 1, -k, 0, ...) / √(k(k+1))
    (k ones), so columns 1..n-1 span the vectors on the first n channels with zero sum over them."""
    h = torch.zeros(d, d, dtype=torch.float64)
    h[:, 0] = d**-0.5
    for k in range(1, d):
        h[:k, k] = 1.0
        h[k, k] = -float(k)
        h[:, k] /= math.sqrt(k * (k + 1))
    return h


def principal_rotation(moments: Tensor) -> Tensor:
    """Q (d, d), orthogonal, Q 1 = 1: maps the k-th principal direction of `moments` (a second moment
    of centred vectors) onto the Helmert column k (k >= 1), the all-ones direction onto itself."""
    d = moments.shape[0]
    h = helmert(d)
    basis = h[:, 1:]  # d, d - 1: an orthonormal basis of the centred hyperplane
    values, vectors = torch.linalg.eigh(basis.T @ moments.double() @ basis)
    vectors = vectors[:, values.argsort(descending=True)]  # d - 1, d - 1: principal first
    vectors *= torch.where(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # fixed signs
    principal = basis @ vectors  # d, d - 1: the principal directions, in the centred hyperplane
    return h[:, :1] @ h[:, :1].T + basis @ principal.T


@torch.no_grad()
def rotate(model: PrunableViT, q: Tensor) -> None:
    """The stream x -> Q x: writers W <- Q W, readers W <- W Qᵀ. Needs the LayerNorms folded (gain 1,
    bias 0), the LayerScales folded and the writers centred (`in_basis`), and Q 1 = 1."""
    for norm, _ in _readers(model):
        if not (bool((norm.weight == 1).all()) and bool((norm.bias == 0).all())):
            raise ValueError("rotate needs the reading LayerNorms folded into their linears (fold_norms) first")
    q = q.double()
    for t, axis in stream_writers(model):
        _along(t, axis, q)
    for _, layers in _readers(model):
        for layer in layers:
            layer.weight.data.copy_((layer.weight.double() @ q.T).to(layer.weight.dtype))  # out, e


@dataclass
class StreamBasis:
    """The principal basis of a model's stream: `rotation` Q (d, d), and per channel of the rotated
    stream the energy the writers put there per image (d,), summed over writers (what narrowing the
    stream drops from them, when it drops that channel)."""

    rotation: Tensor
    energy: Tensor


def _prepared(model: PrunableViT) -> PrunableViT:
    """A copy of `model`, the same function, ready to rotate: LayerScales and norms folded, writers centred."""
    check_rotatable(model)
    prepared = copy.deepcopy(model).eval()
    fold_layer_scales(prepared)
    centre_writers(prepared)
    fold_norms(prepared)
    return prepared


def measure_basis(model: PrunableViT, images: Iterable[Tensor], device: str | torch.device = "cpu") -> StreamBasis:
    """The principal basis of `model`'s stream on `images` (batches of images)."""
    moments, written = stream_statistics(_prepared(model), images, device)
    q = principal_rotation(moments)
    return StreamBasis(q, (q @ written @ q.T).diagonal().clone())


def in_basis(model: PrunableViT, basis: StreamBasis) -> PrunableViT:
    """A copy of `model` computing the same function with its stream in `basis`."""
    rotated = _prepared(model)
    rotate(rotated, basis.rotation)
    return rotated


def _stream_norms(model: PrunableViT) -> list[MaskedLayerNorm]:
    return [norm for norm, _ in _readers(model)]


@torch.no_grad()
def narrow_stream(model: PrunableViT, width: int) -> None:
    """Keep the leading `width` channels of the stream of a masked model in the principal basis (mask
    and zero the others) and scale the stream's LayerNorm gains by sqrt(d / width), d the live width
    before: the LayerNorms' variance now runs over `width` channels, the stream's energy stays."""
    live = int(model.emb_mask.count_nonzero())
    if live != model.dims.emb:
        raise ValueError("narrow_stream narrows a stream whose channels are all live")
    if not 1 < width <= live:
        raise ValueError(f"the stream width must lie in [2, {live}], got {width}")
    if width == live:
        return
    Structure(model, dict.fromkeys(KINDS, 1)).prune([(EMB, torch.arange(width, live))])
    for norm in _stream_norms(model):
        norm.weight.mul_(math.sqrt(live / width))
