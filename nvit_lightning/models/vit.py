"""A timm-style Vision Transformer whose every structure can be masked and then physically removed.

It reproduces timm's `VisionTransformer` (and DeiT's distilled variant) for the features listed in
`FEATURES`: class / distillation / register tokens, position embedding with or without the prefix
tokens (`no_embed_class`), token or average pooling with `fc_norm`, LayerScale, CLIP's `pre_norm`,
`qk_norm` and the source's LayerNorm eps. Differences from timm, each needed by NViT:
- per-block head count, QK width and V width (head alignment: all heads of a block share them);
- separate q, k, v projections, because QK and V widths are pruned independently;
- optional structural masks (buffers) for EMB channels, heads, QK dims, V dims and MLP neurons;
  every LayerNorm (over the residual stream, or over a head's q/k dims with `qk_norm`) computes its
  statistics over live channels only, so a masked model and its `compact()` version compute the
  same function;
- the attention scale stays 1/sqrt(d) of the *source* model's head dim (`attn_scale_dims`): the
  pretrained weights were trained with it, and re-deriving it from a pruned QK width would change the
  function that pruning is supposed to preserve.

`save_pretrained` writes timm's `config.json` + `model.safetensors`: after `import nvit_lightning`,
`timm.create_model("local-dir:<dir>", pretrained=True)` builds the model (`registry.py`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .dims import ViTDims

CONFIG_FILE = "config.json"  # timm's format (architecture, model_args, pretrained_cfg)
LEGACY_CONFIG_FILE = "dims.json"  # written before config.json; still read
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "nvit_vit"  # the timm entry point that builds a PrunableViT (registry.py)
FILE_MODE = 0o644  # model files are meant to be shared: never the 0600 of a temp file

POOLS = ("token", "avg", "avgmax", "max")
# timm VisionTransformer features PrunableViT reproduces, with timm's defaults; a model's `config`
# lists only those that differ, so a DeiT's config (and its checkpoints) read as before
FEATURES = dict(global_pool="token", fc_norm=None, class_token=True, reg_tokens=0, no_embed_class=False,
                init_values=None, pre_norm=False, qk_norm=False, norm_eps=1e-6)


def _apply_emb_mask(x: Tensor, emb_mask: Tensor | None) -> Tensor:
    return x if emb_mask is None else x * emb_mask


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm whose mean and variance run over the live channels (`mask`) only."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # the input is zero on dead channels, so x.sum() already sums live channels only
        n_live = mask.sum()
        mean = x.sum(-1, keepdim=True) / n_live
        centred = (x - mean) * mask
        var = centred.pow(2).sum(-1, keepdim=True) / n_live
        return (centred * torch.rsqrt(var + self.eps) * self.weight + self.bias) * mask


class NoNorm(nn.Identity):
    """Where timm has `nn.Identity()` instead of a norm (e.g. `norm` when `fc_norm` takes its place)."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x


class LayerScale(nn.Module):
    """timm's LayerScale: a learned per-channel gain on a residual branch (CaiT, DeiT-3, DINOv2)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def _live(mask: Tensor | None, size: int, device: torch.device) -> Tensor:
    return torch.arange(size, device=device) if mask is None else mask.nonzero().flatten()


def _outer_live(outer: Tensor | None, inner: Tensor | None, n_outer: int, n_inner: int,
                device: torch.device) -> Tensor:
    """Flat indices of the live (outer, inner) pairs of a (n_outer * n_inner) axis, e.g. (head, v)."""
    o = torch.ones(n_outer, device=device) if outer is None else outer
    i = torch.ones(n_inner, device=device) if inner is None else inner
    return (o[:, None] * i[None, :]).flatten().nonzero().flatten()


class Attention(nn.Module):
    """Multi-head self-attention with `num_heads` heads of width `qk_dim` (queries/keys) and `v_dim`."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, qkv_bias: bool = True,
                 scale_dim: int | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 masked: bool = True, qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale_dim = scale_dim or qk_dim
        self.scale = self.scale_dim**-0.5
        self.q = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, num_heads * v_dim, bias=qkv_bias)
        # qk_norm: one LayerNorm over each head's qk dims, shared by the heads (timm's q_norm / k_norm)
        self.q_norm = MaskedLayerNorm(qk_dim, eps=norm_eps) if qk_norm else NoNorm()
        self.k_norm = MaskedLayerNorm(qk_dim, eps=norm_eps) if qk_norm else NoNorm()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(num_heads * v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.masked = masked
        if masked:
            self.register_buffer("head_mask", torch.ones(num_heads))
            self.register_buffer("qk_mask", torch.ones(qk_dim))
            self.register_buffer("v_mask", torch.ones(v_dim))

    def _one_gemm(self) -> bool:
        """Whether q, k and v may run as one matrix product: at inference (no autograd), with plain
        dense weights (not e.g. 2:4-compressed ones) and no module hooks on them that it would skip."""
        layers = (self.q, self.k, self.v)
        return (not torch.is_grad_enabled()
                and all(type(m.weight) in (nn.Parameter, Tensor) for m in layers)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in layers))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values of the tokens x (B, N, dim): (B, N, H * qk) twice, (B, N, H * v)."""
        if not self._one_gemm():
            return self.q(x), self.k(x), self.v(x)
        # one GEMM instead of three narrow ones: 1-4 % of DeiT-Tiny's CPU latency
        # (benchmarks/module_speed.py); the weights are concatenated per call, which costs far less
        biases = [m.bias for m in (self.q, self.k, self.v)]
        qkv = F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]),
                       None if biases[0] is None else torch.cat(biases))  # B, N, H * (2 qk + v)
        qk = self.num_heads * self.qk_dim
        return qkv.split([qk, qk, self.num_heads * self.v_dim], dim=-1)

    def attend(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The heads' outputs, concatenated: the input of `proj` (B, N, heads * v)."""
        B, N, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, N, self.num_heads, self.qk_dim).transpose(1, 2)  # B, H, N, qk
        k = k.view(B, N, self.num_heads, self.qk_dim).transpose(1, 2)  # B, H, N, qk
        v = v.view(B, N, self.num_heads, self.v_dim).transpose(1, 2)  # B, H, N, v
        qk_mask = self.qk_mask if self.masked else None
        if self.masked:
            q, k, v = q * self.qk_mask, k * self.qk_mask, v * self.v_mask
        q, k = self.q_norm(q, qk_mask), self.k_norm(k, qk_mask)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # B, H, N, v
        if self.masked:
            x = x * self.head_mask[:, None, None]
        return x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)

    @property
    def removed(self) -> bool:
        """A compact attention with no heads left (depth pruning): its output is proj's bias."""
        return self.num_heads == 0

    def inner(self, x: Tensor) -> Tensor:
        return self.attend(x)

    def out(self, heads: Tensor) -> Tensor:
        """The heads' outputs (B, N, heads * v) -> the attention's output (B, N, dim)."""
        return self.proj_drop(self.proj(heads))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.out(self.attend(x, attn_mask, is_causal))

    # ---- what the least-squares refit needs (pruning/reconstruct.py) ----------------------------
    def readers(self) -> dict[str, tuple[nn.Linear, Tensor]]:
        """The layers reading the normed stream, each with the indices of its live output rows."""
        dev = self.q.weight.device
        masks = (self.head_mask, self.qk_mask, self.v_mask) if self.masked else (None,) * 3
        qk_rows = _outer_live(masks[0], masks[1], self.num_heads, self.qk_dim, dev)
        v_rows = _outer_live(masks[0], masks[2], self.num_heads, self.v_dim, dev)
        return {"q": (self.q, qk_rows), "k": (self.k, qk_rows), "v": (self.v, v_rows)}

    def writer(self) -> tuple[nn.Linear, Tensor]:
        """The layer writing into the stream, with the indices of its live input columns."""
        masks = (self.head_mask, self.v_mask) if self.masked else (None, None)
        return self.proj, _outer_live(*masks, self.num_heads, self.v_dim, self.proj.weight.device)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0, masked: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.masked = masked
        if masked:
            self.register_buffer("mask", torch.ones(hidden))

    def hidden(self, x: Tensor) -> Tensor:
        """The activations of the hidden neurons: the input of `fc2` (B, N, hidden)."""
        x = self.act(self.fc1(x))
        return x * self.mask if self.masked else x

    @property
    def removed(self) -> bool:
        """A compact MLP with no neurons left (depth pruning): its output is fc2's bias."""
        return self.fc1.out_features == 0

    def inner(self, x: Tensor) -> Tensor:
        return self.hidden(x)

    def out(self, hidden: Tensor) -> Tensor:
        return self.fc2(self.drop(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))

    def readers(self) -> dict[str, tuple[nn.Linear, Tensor]]:
        mask = self.mask if self.masked else None
        return {"fc1": (self.fc1, _live(mask, self.fc1.out_features, self.fc1.weight.device))}

    def writer(self) -> tuple[nn.Linear, Tensor]:
        mask = self.mask if self.masked else None
        return self.fc2, _live(mask, self.fc2.in_features, self.fc2.weight.device)


@dataclass(frozen=True)
class Branch:
    """One residual branch of a block, `x + scale ⊙ writer(inner(norm(x)))`: what a per-layer refit
    solves, in order: the `readers` (q, k, v / fc1) from the normed stream, then the `writer` (proj /
    fc2) from `inner` (the heads' outputs / the hidden activations). `reader_option` and
    `writer_option` are the names `conf/reconstruction` uses for them."""

    name: str  # "attn" | "mlp", the module's attribute name in the block
    norm: MaskedLayerNorm
    mixer: Attention | Mlp
    layer_scale: LayerScale | nn.Identity
    reader_option: str
    writer_option: str

    @property
    def scale(self) -> Tensor | None:
        """The LayerScale gain on the writer's output channels (None without LayerScale)."""
        return self.layer_scale.gamma if isinstance(self.layer_scale, LayerScale) else None

    def write(self, inner: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        """The branch's contribution to the stream from the writer's input (B, N, emb)."""
        return _apply_emb_mask(self.layer_scale(self.mixer.out(inner)), emb_mask)

    def __call__(self, x: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        """The branch's contribution to the stream x (B, N, emb): what the block adds to x."""
        if self.mixer.removed:  # no heads / neurons left: the writer's bias is all it adds (no norm, no GEMM)
            writer = self.mixer.writer()[0]
            return _apply_emb_mask(self.layer_scale(self.mixer.out(x.new_zeros(1, 1, writer.in_features))),
                                   emb_mask).expand(x.shape)
        # the mixer is called as a module (not inner + out) so its forward hooks run, e.g. saliency gates
        return _apply_emb_mask(self.layer_scale(self.mixer(self.norm(x, emb_mask))), emb_mask)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, mlp_dim: int,
                 qkv_bias: bool = True, scale_dim: int | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, masked: bool = True,
                 init_values: float | None = None, qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = MaskedLayerNorm(dim, eps=norm_eps)
        with warnings.catch_warnings():  # a removed sub-layer (0 heads / neurons) has zero-element weights
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.attn = Attention(dim, num_heads, qk_dim, v_dim, qkv_bias, scale_dim, attn_drop, drop, masked,
                                  qk_norm, norm_eps)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = MaskedLayerNorm(dim, eps=norm_eps)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.mlp = Mlp(dim, mlp_dim, drop, masked)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def branches(self) -> tuple[Branch, Branch]:
        """The block's two residual branches, in the order forward runs them (its refit plan)."""
        return (Branch("attn", self.norm1, self.attn, self.ls1, "qkv", "proj"),
                Branch("mlp", self.norm2, self.mlp, self.ls2, "fc1", "fc2"))

    def forward(self, x: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        attn, mlp = self.branches()
        x = x + self.drop_path1(attn(x, emb_mask))
        x = x + self.drop_path2(mlp(x, emb_mask))
        return x


class PrunableViT(nn.Module):
    """timm's VisionTransformer / DeiT (see `FEATURES`) with per-block dims and structural masks.

    With `masked=True` every structure carries a 0/1 mask buffer (`emb_mask`,
    `blocks.i.attn.{head,qk,v}_mask`, `blocks.i.mlp.mask`); `compact()` returns the physically
    smaller, mask-free model that computes the same function. timm's classifier API
    (`forward_features`, `forward_head`, `reset_classifier`, `get_classifier`, `pretrained_cfg`, ...)
    works as on a timm model.
    """

    def __init__(self, dims: ViTDims | dict, img_size: int | Sequence[int] = 224, patch_size: int = 16,
                 in_chans: int = 3, num_classes: int = 1000, distilled: bool = False,
                 qkv_bias: bool = True, attn_scale_dims: Sequence[int] | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 masked: bool = True, global_pool: str = "token", fc_norm: bool | None = None,
                 class_token: bool = True, reg_tokens: int = 0, no_embed_class: bool = False,
                 init_values: float | None = None, pre_norm: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-6, pretrained_cfg: dict | None = None) -> None:
        super().__init__()
        dims = ViTDims.from_dict(dims) if isinstance(dims, dict) else dims
        img_size = _square(img_size, "img_size")
        attn_scale_dims = list(attn_scale_dims or dims.qk)
        if len(attn_scale_dims) != dims.depth:
            raise ValueError(f"attn_scale_dims needs {dims.depth} entries, got {len(attn_scale_dims)}")
        features = dict(global_pool=global_pool, fc_norm=fc_norm, class_token=class_token,
                        reg_tokens=int(reg_tokens), no_embed_class=no_embed_class, init_values=init_values,
                        pre_norm=pre_norm, qk_norm=qk_norm, norm_eps=float(norm_eps))
        _check_features(features, distilled)
        self.dims, self.masked = dims, masked
        self.config = dict(dims=dims.to_dict(), img_size=img_size, patch_size=patch_size,
                           in_chans=in_chans, num_classes=num_classes, distilled=distilled,
                           qkv_bias=qkv_bias, attn_scale_dims=attn_scale_dims,
                           **_with_features({}, **features))
        e = dims.emb
        self.num_classes, self.distilled, self.global_pool = num_classes, distilled, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = e
        self.has_class_token, self.no_embed_class = class_token, no_embed_class
        self.num_reg_tokens = int(reg_tokens)
        self.num_prefix_tokens = int(class_token) + int(distilled) + self.num_reg_tokens
        self.grad_checkpointing = False
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        # CLIP-style models (pre_norm) have no patch embedding bias, as in timm
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, e, bias=not pre_norm)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, e)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, self.num_reg_tokens, e)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, e))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = MaskedLayerNorm(e, eps=norm_eps) if pre_norm else NoNorm()
        drop_paths = torch.linspace(0, drop_path_rate, dims.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(e, dims.heads[i], dims.qk[i], dims.v[i], dims.mlp[i], qkv_bias, attn_scale_dims[i],
                  drop_rate, attn_drop_rate, drop_paths[i], masked, init_values, qk_norm, norm_eps)
            for i in range(dims.depth)
        )
        self.norm = NoNorm() if use_fc_norm else MaskedLayerNorm(e, eps=norm_eps)
        self.fc_norm = MaskedLayerNorm(e, eps=norm_eps) if use_fc_norm else NoNorm()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(e, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(e, num_classes) if num_classes > 0 else nn.Identity()) if distilled else None
        if masked:
            self.register_buffer("emb_mask", torch.ones(e))
        self._init_weights()
        # the source's preprocessing (mean, std, crop, ...), at this model's fixed input size
        self.pretrained_cfg = {**(_tuples(pretrained_cfg) if pretrained_cfg else default_pretrained_cfg(self.config)),
                               "input_size": (in_chans, img_size, img_size), "num_classes": num_classes}
        self.default_cfg = self.pretrained_cfg  # timm's old name for it
        # checkpoints in timm's layout (fused qkv) load directly, e.g. via timm's `checkpoint_path`
        self._register_load_state_dict_pre_hook(_to_own_layout_hook, with_module=True)

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def emb_mask_or_none(self) -> Tensor | None:
        return self.emb_mask if self.masked else None

    # ---- forward ----------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Images -> the residual stream entering the first block (B, prefix + patches, e)."""
        x = self.patch_embed(x)  # B, N, e
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.no_embed_class:  # DeiT-3, DINOv2 registers: no position for the prefix tokens
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)  # B, prefix + N, e
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed  # B, prefix + N, e
        x = _apply_emb_mask(self.pos_drop(x), self.emb_mask_or_none)
        return self.norm_pre(x, self.emb_mask_or_none)  # CLIP's pre_norm; the output stays masked

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> the normed token features (B, prefix + patches, e), as timm's."""
        emb_mask = self.emb_mask_or_none
        x = self.embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, emb_mask, use_reentrant=False)
            else:
                x = block(x, emb_mask)
        return self.norm(x, emb_mask)

    def pool(self, x: Tensor) -> Tensor:
        """Token features (B, N, e) -> one feature vector per image (B, e), by `global_pool`."""
        if self.global_pool == "token":
            return x[:, 0]  # the class token
        x = x[:, self.num_prefix_tokens:]  # patch tokens only, as timm's default
        if self.global_pool == "avg":
            return x.mean(dim=1)
        if self.global_pool == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def _pre_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Token features -> the classifier inputs of the head and (distilled) of head_dist."""
        if self.distilled:
            return self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        return self.head_drop(self.fc_norm(self.pool(x), self.emb_mask_or_none)), None

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Token features -> logits (B, classes), or with `pre_logits` the classifier input (B, e)."""
        x, x_dist = self._pre_logits(x)
        if pre_logits:
            return x if x_dist is None else (x + x_dist) / 2
        return self.head(x) if x_dist is None else (self.head(x) + self.head_dist(x_dist)) / 2

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits of the classifier and, for distilled models, of the distillation token's head."""
        x, x_dist = self._pre_logits(self.forward_features(x))
        return self.head(x), None if x_dist is None else self.head_dist(x_dist)

    def forward(self, x: Tensor) -> Tensor:
        logits, logits_dist = self.forward_heads(x)
        return logits if logits_dist is None else (logits + logits_dist) / 2

    # ---- timm's model API ---------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for `num_classes` classes (0: none, `forward` returns the pooled features),
        initialised as timm's `reset_classifier` does; `global_pool` changes the pooling, keeping
        the current fc_norm placement (as timm)."""
        if global_pool is not None:
            if self.distilled and global_pool != "token":
                raise ValueError("a distilled model's heads read the class and distillation tokens: "
                                 f"global_pool must stay 'token', got {global_pool!r}")
            _check_features({**FEATURES, "global_pool": global_pool, "class_token": self.has_class_token},
                            self.distilled)
            self.global_pool = global_pool
            # fc_norm's default follows global_pool: keep the norms this model has, explicitly
            self.config = _with_features(self.config, global_pool=global_pool,
                                         fc_norm=isinstance(self.fc_norm, MaskedLayerNorm))
        device = self.pos_embed.device
        heads = ["head"] + (["head_dist"] if self.distilled else [])
        for name in heads:
            head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
            if num_classes > 0 and self.masked:  # pruned EMB columns stay zero, as pruning leaves them
                with torch.no_grad():
                    head.weight.mul_(self.emb_mask)
            setattr(self, name, head.train(self.training))
        self.num_classes = self.config["num_classes"] = num_classes
        cfg = {k: v for k, v in self.pretrained_cfg.items() if k not in ("label_names", "label_descriptions")}
        self.pretrained_cfg = self.default_cfg = {**cfg, "num_classes": num_classes}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|dist_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    # ---- structure ------------------------------------------------------------------------------
    def live_dims(self) -> ViTDims:
        """The dims the model has once masked units are removed."""
        if not self.masked:
            return self.dims
        from .structure import live_dims

        return live_dims(self)

    def masks(self) -> dict[str, Tensor]:
        return {name: buf for name, buf in self.named_buffers() if name.endswith("mask")}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def size_of(self, dims: ViTDims | None = None) -> dict[str, int]:
        """Parameters and MACs per image of this model's compact form (or of other `dims`)."""
        from .structure import compact_num_params

        dims = dims or self.live_dims()
        c = self.config
        macs = dims.macs(num_classes=c["num_classes"], patch_size=c["patch_size"], in_chans=c["in_chans"],
                         num_patches=self.patch_embed.num_patches, distilled=c["distilled"],
                         prefix_tokens=self.num_prefix_tokens)
        return {"params": compact_num_params(self, dims), "macs": macs}

    def compact(self) -> PrunableViT:
        """A new mask-free model with the live dims and the live weights (see `compact.py`)."""
        from .compact import compact_vit

        return compact_vit(self)

    def with_masks(self) -> PrunableViT:
        """A masked (prunable) copy of a mask-free model, all masks full."""
        model = PrunableViT(**{**self.config, "masked": True, "pretrained_cfg": self.pretrained_cfg})
        model.load_state_dict(self.state_dict(), strict=False)
        return model.to(next(self.parameters()).device)

    # ---- save / load ----------------------------------------------------------------------------
    def timm_config(self) -> dict:
        """timm's `config.json`: `architecture` (our timm entry point), `model_args` (this model's
        constructor arguments, every feature flag spelled out), and the source's `pretrained_cfg`
        (preprocessing: mean / std / input_size / crop_pct / interpolation)."""
        model_args = {**FEATURES, **self.config, "masked": self.masked}
        cfg = {k: v for k, v in self.pretrained_cfg.items()
               if k in _PRETRAINED_CFG_FIELDS and k not in _SOURCE_FIELDS and v is not None}
        cfg.update(num_classes=self.num_classes, input_size=[self.config["in_chans"], *[self.config["img_size"]] * 2],
                   fixed_input_size=True, first_conv="patch_embed.proj", custom_load=False,
                   classifier="head" if self.head_dist is None else ["head", "head_dist"])
        return {"architecture": ARCHITECTURE, "num_classes": self.num_classes, "num_features": self.num_features,
                "global_pool": self.global_pool, "model_args": model_args, "pretrained_cfg": cfg}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` (timm's format) and `model.safetensors` (weights, masks); no pickles.
        `timm.create_model(f"local-dir:{directory}", pretrained=True)` loads it back."""
        from safetensors.torch import save_file

        check_finite(self, f"{directory}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / CONFIG_FILE, json.dumps(self.timm_config(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(directory / WEIGHTS_FILE, FILE_MODE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> PrunableViT:
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() and (directory / LEGACY_CONFIG_FILE).is_file():
            config_path = directory / LEGACY_CONFIG_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: expected a directory written by "
                                        f"PrunableViT.save_pretrained")
        model_args = read_model_args(config_path)
        try:
            model = cls(**model_args)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{config_path} holds an invalid PrunableViT config ({err})") from None
        try:
            state = load_file(str(weights_path), device=map_location)
        except Exception as err:  # safetensors raises its own error type for truncated or foreign files
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err})") from None
        load_checked_state_dict(model, state, str(weights_path))
        return model


def read_model_args(config_path: str | Path) -> dict:
    """PrunableViT constructor arguments (pretrained_cfg included) from a `config.json` written by
    `save_pretrained`, or from the older `dims.json` format."""
    config_path = Path(config_path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is corrupt ({err}): write the model again with save_pretrained") from None
    if isinstance(config, dict) and config.get("architecture") == ARCHITECTURE:  # timm's format
        if not isinstance(config.get("model_args"), dict):
            raise ValueError(f"{config_path} has no model_args: not written by PrunableViT.save_pretrained")
        return {**config["model_args"], "pretrained_cfg": config.get("pretrained_cfg") or None}
    if not isinstance(config, dict) or config.pop("architecture", None) != "PrunableViT":  # dims.json
        raise ValueError(f"{config_path} does not describe a PrunableViT")
    return config


def default_pretrained_cfg(config: dict) -> dict:
    """timm's pretrained_cfg of a model built from scratch: DeiT's ImageNet preprocessing."""
    size = config["img_size"]
    return dict(architecture=ARCHITECTURE, input_size=(config["in_chans"], size, size), fixed_input_size=True,
                interpolation="bicubic", crop_pct=0.9, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                num_classes=config["num_classes"], first_conv="patch_embed.proj",
                classifier=("head", "head_dist") if config["distilled"] else "head")


def write_text(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, FILE_MODE)


def _check_features(features: dict, distilled: bool) -> None:
    if features["global_pool"] not in POOLS:
        raise ValueError(f"global_pool must be one of {POOLS}, got {features['global_pool']!r}")
    if features["global_pool"] == "token" and not features["class_token"]:
        raise ValueError("global_pool='token' needs the class token (class_token=True)")
    if distilled and (not features["class_token"] or features["reg_tokens"] or features["global_pool"] != "token"):
        raise ValueError("a distilled model has a class token, no register tokens and global_pool='token'")


def _square(size: int | Sequence[int], name: str) -> int:
    if isinstance(size, int):
        return size
    size = list(size)
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{name} must be one int (square images), got {size}")
    return int(size[0])


def _tuples(cfg: dict) -> dict:
    """JSON lists back to the tuples timm's pretrained_cfg holds (mean, std, input_size, ...)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _with_features(config: dict, **features: object) -> dict:
    """`config` with `features` set, listing only those that differ from timm's defaults."""
    out = {**config, **features}
    return {k: v for k, v in out.items() if k not in FEATURES or v != FEATURES[k]}


def _pretrained_cfg_fields() -> frozenset[str]:
    from dataclasses import fields

    from timm.models import PretrainedCfg

    return frozenset(f.name for f in fields(PretrainedCfg))


_PRETRAINED_CFG_FIELDS = _pretrained_cfg_fields()
# where the source's weights came from: not where ours are
_SOURCE_FIELDS = frozenset({"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag",
                            "architecture"})


class NonFiniteWeightsError(ValueError):
    """A model with NaN or infinite weights was about to be saved."""


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse to write `what` from a model with a NaN or infinite parameter or buffer."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(f"{name} holds NaN/inf values: not writing {what} (training diverged: "
                                        f"lower the learning rate)")


def load_checked_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with one readable error naming the mismatched tensors."""
    own = model.state_dict()
    state_dict = to_own_layout(state_dict, own)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}" if unexpected else "",
            f"shape mismatch {wrong[:3]}{'...' if len(wrong) > 3 else ''}" if wrong else "",
        ]))
        raise ValueError(f"checkpoint {source} does not match the model's architecture: {details}")
    model.load_state_dict(state_dict, strict=True)


def to_own_layout(state_dict: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's fused `attn.qkv` -> separate `attn.q/k/v` (equal thirds, as in a dense timm ViT), and
    full masks where a dense checkpoint loads into a masked model (`own` is the model's state)."""
    out = {k: v for k, v in own.items() if k.endswith("mask") and k not in state_dict}
    for key, value in state_dict.items():
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[key.replace(".qkv.", f".{name}.")] = part
        else:
            out[key] = value
    return out


def _to_own_layout_hook(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                        *args: object) -> None:
    ours = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    state_dict.update({prefix + k: v for k, v in to_own_layout(ours, module.state_dict()).items()})


def write_model_card(directory: str | Path, info: dict) -> Path:
    """Write `README.md`, a model card, beside a saved model. `info` keys (all optional but `source`):
    source (the model it was pruned from, e.g. a timm name), target (latency ratio), speedup
    (measured), device (where it was measured), top1 (accuracy, %), dataset (what top1 was
    measured on), plus any other key, listed as is. The model's own config.json adds its dims."""
    directory = Path(directory)
    info = dict(info)
    if "source" not in info:
        raise ValueError("write_model_card needs info['source']: the model this one was pruned from")
    config_path = directory / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    args = config.get("model_args", {})
    rows = [("source model", info.pop("source")), ("latency target", info.pop("target", None)),
            ("measured speed-up", _fmt(info.pop("speedup", None), "{:.2f}x")),
            ("measured on", info.pop("device", None)), ("top-1", _fmt(info.pop("top1", None), "{:.2f} %")),
            ("evaluated on", info.pop("dataset", None)), *info.items()]
    lines = ["---", "library_name: timm", "tags: [image-classification, timm, pruned, nvit]", "---", "",
             f"# {directory.name}", "",
             "A structurally pruned Vision Transformer (NViT global structural pruning, nvit-lightning).", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows if v is not None]]
    if "dims" in args:
        dims = ViTDims.from_dict(args["dims"])
        lines += ["", "## Architecture", "", f"embedding width {dims.emb}, {dims.depth} blocks", "",
                  "| block | heads | qk / head | v / head | mlp |", "|---|---|---|---|---|",
                  *[f"| {i} | {h} | {q} | {v} | {m} |" for i, (h, q, v, m)
                    in enumerate(zip(dims.heads, dims.qk, dims.v, dims.mlp))]]
    lines += ["", "## Usage", "", "```python", "import timm", "import nvit_lightning  # registers the architecture",
              "", f'model = timm.create_model("local-dir:{directory}", pretrained=True).eval()', "```", ""]
    path = directory / "README.md"
    directory.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(lines))
    return path


def _fmt(value: object, pattern: str) -> object:
    return pattern.format(value) if isinstance(value, int | float) else value
