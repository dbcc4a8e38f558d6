"""A DeiT-style Vision Transformer whose every structure can be masked and then physically removed.

Differences from timm's `VisionTransformer`, each needed by NViT:
- per-block head count, QK width and V width (head alignment: all heads of a block share them);
- separate q, k, v projections, because QK and V widths are pruned independently;
- optional structural masks (buffers) for EMB channels, heads, QK dims, V dims and MLP neurons;
  LayerNorm statistics run over live EMB channels only, so a masked model and its `compact()`
  version compute the same function;
- the attention scale stays 1/sqrt(d) of the *source* model's head dim (`attn_scale_dims`): the
  pretrained weights were trained with it, and re-deriving it from a pruned QK width would change the
  function that pruning is supposed to preserve.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from torch import Tensor, nn

from .dims import ViTDims

CONFIG_FILE = "dims.json"
WEIGHTS_FILE = "model.safetensors"


def _apply_emb_mask(x: Tensor, emb_mask: Tensor | None) -> Tensor:
    return x if emb_mask is None else x * emb_mask


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm whose mean and variance run over the live EMB channels only."""

    def forward(self, x: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        if emb_mask is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # the residual stream is zero on dead channels, so x.sum() already sums live channels only
        n_live = emb_mask.sum()
        mean = x.sum(-1, keepdim=True) / n_live
        centred = (x - mean) * emb_mask
        var = centred.pow(2).sum(-1, keepdim=True) / n_live
        return (centred * torch.rsqrt(var + self.eps) * self.weight + self.bias) * emb_mask


class Attention(nn.Module):
    """Multi-head self-attention with `num_heads` heads of width `qk_dim` (queries/keys) and `v_dim`."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, qkv_bias: bool = True,
                 scale_dim: int | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 masked: bool = True) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale_dim = scale_dim or qk_dim
        self.scale = self.scale_dim**-0.5
        self.q = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, num_heads * v_dim, bias=qkv_bias)
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
        if self.masked:
            q, k, v = q * self.qk_mask, k * self.qk_mask, v * self.v_mask
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # B, H, N, v
        if self.masked:
            x = x * self.head_mask[:, None, None]
        return x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.proj_drop(self.proj(self.attend(x, attn_mask, is_causal)))


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

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.hidden(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, mlp_dim: int,
                 qkv_bias: bool = True, scale_dim: int | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, masked: bool = True) -> None:
        super().__init__()
        self.norm1 = MaskedLayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_dim, v_dim, qkv_bias, scale_dim, attn_drop, drop, masked)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = MaskedLayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, drop, masked)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path1(_apply_emb_mask(self.attn(self.norm1(x, emb_mask)), emb_mask))
        x = x + self.drop_path2(_apply_emb_mask(self.mlp(self.norm2(x, emb_mask)), emb_mask))
        return x


class PrunableViT(nn.Module):
    """DeiT / ViT (class token, learned position embedding, optional distillation token).

    With `masked=True` every structure carries a 0/1 mask buffer (`emb_mask`,
    `blocks.i.attn.{head,qk,v}_mask`, `blocks.i.mlp.mask`); `compact()` returns the physically
    smaller, mask-free model that computes the same function.
    """

    def __init__(self, dims: ViTDims | dict, img_size: int = 224, patch_size: int = 16,
                 in_chans: int = 3, num_classes: int = 1000, distilled: bool = False,
                 qkv_bias: bool = True, attn_scale_dims: Sequence[int] | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 masked: bool = True) -> None:
        super().__init__()
        dims = ViTDims.from_dict(dims) if isinstance(dims, dict) else dims
        attn_scale_dims = list(attn_scale_dims or dims.qk)
        if len(attn_scale_dims) != dims.depth:
            raise ValueError(f"attn_scale_dims needs {dims.depth} entries, got {len(attn_scale_dims)}")
        self.dims, self.masked = dims, masked
        self.config = dict(dims=dims.to_dict(), img_size=img_size, patch_size=patch_size,
                           in_chans=in_chans, num_classes=num_classes, distilled=distilled,
                           qkv_bias=qkv_bias, attn_scale_dims=attn_scale_dims)
        e = dims.emb
        self.num_classes, self.distilled = num_classes, distilled
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, e)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, e)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, e))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, dims.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(e, dims.heads[i], dims.qk[i], dims.v[i], dims.mlp[i], qkv_bias, attn_scale_dims[i],
                  drop_rate, attn_drop_rate, drop_paths[i], masked)
            for i in range(dims.depth)
        )
        self.norm = MaskedLayerNorm(e, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(e, num_classes)
        self.head_dist = nn.Linear(e, num_classes) if distilled else None
        if masked:
            self.register_buffer("emb_mask", torch.ones(e))
        self._init_weights()
        # checkpoints in timm's layout (fused qkv) load directly, e.g. via timm's `checkpoint_path`
        self._register_load_state_dict_pre_hook(_to_own_layout_hook, with_module=True)

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def emb_mask_or_none(self) -> Tensor | None:
        return self.emb_mask if self.masked else None

    def embed(self, x: Tensor) -> Tensor:
        """Images -> the residual stream entering the first block (B, prefix + patches, e)."""
        x = self.patch_embed(x)  # B, N, e
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed  # B, prefix + N, e
        return _apply_emb_mask(self.pos_drop(x), self.emb_mask_or_none)

    def forward_features(self, x: Tensor) -> Tensor:
        emb_mask = self.emb_mask_or_none
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, emb_mask)
        return self.norm(x, emb_mask)

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits of the class token and, for distilled models, of the distillation token."""
        features = self.forward_features(x)
        logits = self.head(self.head_drop(features[:, 0]))
        if self.head_dist is None:
            return logits, None
        return logits, self.head_dist(self.head_drop(features[:, 1]))

    def forward(self, x: Tensor) -> Tensor:
        logits, logits_dist = self.forward_heads(x)
        return logits if logits_dist is None else (logits + logits_dist) / 2

    # ---- structure ------------------------------------------------------------------------------
    def live_dims(self) -> ViTDims:
        """The dims the model has once masked units are removed."""
        if not self.masked:
            return self.dims
        alive = lambda m: int(m.count_nonzero())  # noqa: E731
        attns = [b.attn for b in self.blocks]
        return ViTDims(alive(self.emb_mask), [alive(a.head_mask) for a in attns],
                       [alive(a.qk_mask) for a in attns], [alive(a.v_mask) for a in attns],
                       [alive(b.mlp.mask) for b in self.blocks])

    def masks(self) -> dict[str, Tensor]:
        return {name: buf for name, buf in self.named_buffers() if name.endswith("mask")}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def size_of(self, dims: ViTDims | None = None) -> dict[str, int]:
        """Parameters and MACs per image of this model's compact form (or of other `dims`)."""
        dims = dims or self.live_dims()
        c = self.config
        shape = dict(num_classes=c["num_classes"], patch_size=c["patch_size"], in_chans=c["in_chans"],
                     num_patches=self.patch_embed.num_patches, distilled=c["distilled"])
        return {"params": dims.num_params(**shape), "macs": dims.macs(**shape)}

    def compact(self) -> PrunableViT:
        """A new mask-free model with the live dims and the live weights (see `compact.py`)."""
        from .compact import compact_vit

        return compact_vit(self)

    def with_masks(self) -> PrunableViT:
        """A masked (prunable) copy of a mask-free model, all masks full."""
        model = PrunableViT(**{**self.config, "masked": True})
        model.load_state_dict(self.state_dict(), strict=False)
        return model.to(next(self.parameters()).device)

    # ---- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `dims.json` (architecture) and `model.safetensors` (weights, masks); no pickles."""
        from safetensors.torch import save_file

        check_finite(self, f"{directory}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"architecture": "PrunableViT", **self.config, "masked": self.masked}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> PrunableViT:
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: expected a directory written by "
                                        f"PrunableViT.save_pretrained")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path} is corrupt ({err}): write the model again with save_pretrained") from None
        if not isinstance(config, dict) or config.pop("architecture", None) != "PrunableViT":
            raise ValueError(f"{config_path} does not describe a PrunableViT")
        try:
            model = cls(**config)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{config_path} holds an invalid PrunableViT config ({err})") from None
        try:
            state = load_file(str(weights_path), device=map_location)
        except Exception as err:  # safetensors raises its own error type for truncated or foreign files
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err})") from None
        load_checked_state_dict(model, state, str(weights_path))
        return model


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
