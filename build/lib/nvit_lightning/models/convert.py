"""Import timm DeiT / ViT weights into a PrunableViT (the `checkpoint_filter_fn` of this project)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .dims import ViTDims
from .vit import PrunableViT, load_checked_state_dict


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A plain state dict from a `.pth`/`.pt` (optionally wrapped in 'model'/'state_dict') or
    `.safetensors` file, loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def dims_from_timm_state_dict(state_dict: dict[str, Tensor], num_heads: int) -> ViTDims:
    """Dense dims of a timm ViT state dict; head count cannot be read off the shapes."""
    if "blocks.0.attn.qkv.weight" not in state_dict:
        raise ValueError("not a timm ViT state dict: no 'blocks.0.attn.qkv.weight'")
    emb = state_dict["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    if emb % num_heads:
        raise ValueError(f"embed dim {emb} is not divisible by num_heads={num_heads}")
    mlp = [state_dict[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)]
    head_dim = emb // num_heads
    return ViTDims(emb, [num_heads] * depth, [head_dim] * depth, [head_dim] * depth, mlp)


def dims_from_timm_model(model: nn.Module) -> ViTDims:
    """Dims of a timm ViT module, also one structurally pruned by another tool (per-block heads,
    head dim and MLP width, embedding narrower than heads x head dim)."""
    heads = [block.attn.num_heads for block in model.blocks]
    head_dims = [block.attn.qkv.out_features // (3 * h) for block, h in zip(model.blocks, heads)]
    return ViTDims(model.cls_token.shape[-1], heads, head_dims, head_dims,
                   [block.mlp.fc1.out_features for block in model.blocks])


def from_timm_state_dict(state_dict: dict[str, Tensor], num_heads: int, masked: bool = True,
                         source: str = "state dict", dims: ViTDims | None = None,
                         **model_kwargs: object) -> PrunableViT:
    dims = dims or dims_from_timm_state_dict(state_dict, num_heads)
    patch_w = state_dict["patch_embed.proj.weight"]  # emb, in_chans, p, p
    distilled = "dist_token" in state_dict
    num_patches = state_dict["pos_embed"].shape[1] - (2 if distilled else 1)
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"{source}: only square patch grids are supported, got {num_patches} patches")
    config = dict(img_size=grid * patch_w.shape[-1], patch_size=patch_w.shape[-1],
                  in_chans=patch_w.shape[1], num_classes=state_dict["head.weight"].shape[0],
                  distilled=distilled, qkv_bias="blocks.0.attn.qkv.bias" in state_dict)
    model = PrunableViT(dims, masked=masked, **{**config, **model_kwargs})
    load_checked_state_dict(model, state_dict, source)
    return model


def from_timm(source: nn.Module | str | dict[str, Tensor], checkpoint_path: str | Path | None = None,
              pretrained: bool = False, num_heads: int | None = None, masked: bool = True,
              **model_kwargs: object) -> PrunableViT:
    """A PrunableViT with the weights of a timm DeiT/ViT, computing the same function.

    `source` is a timm model, a timm model name (weights from `checkpoint_path`, or from the hub with
    `pretrained=True`, which needs the network), or a timm-layout state dict (then `num_heads` is
    required). Extra keyword arguments (e.g. `drop_path_rate`) go to PrunableViT.
    """
    import timm

    if isinstance(source, str):
        if not timm.is_model(source):
            raise ValueError(f"unknown timm model '{source}' (see timm.list_models('deit*'))")
        state = load_state_dict_file(checkpoint_path) if checkpoint_path else None
        source_model = timm.create_model(source, pretrained=pretrained and state is None)
        if state is not None:
            try:
                source_model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
                raise ValueError(f"checkpoint {checkpoint_path} does not fit timm model '{source}': "
                                 f"{first}") from None
        source = source_model
    if isinstance(source, nn.Module):
        _check_supported(source)
        dims = dims_from_timm_model(source)
        # the scale the module really applies: fused attention uses 1/sqrt(its actual head dim)
        scale_dims = [qk if b.attn.fused_attn else round(b.attn.scale ** -2)
                      for b, qk in zip(source.blocks, dims.qk)]
        return from_timm_state_dict(source.state_dict(), source.blocks[0].attn.num_heads, masked,
                                    type(source).__name__, dims,
                                    **{"attn_scale_dims": scale_dims, **model_kwargs})
    if num_heads is None:
        raise ValueError("from_timm(state_dict) needs num_heads: it cannot be read off the shapes")
    return from_timm_state_dict(source, num_heads, masked, **model_kwargs)


def _check_supported(model: nn.Module) -> None:
    """Refuse timm ViT variants whose function PrunableViT cannot reproduce."""
    name = type(model).__name__
    if not hasattr(model, "blocks") or not hasattr(model.blocks[0], "attn"):
        raise ValueError(f"{name} is not a timm VisionTransformer")
    block = model.blocks[0]
    problems = []
    if getattr(model, "global_pool", "token") != "token":
        problems.append(f"global_pool='{model.global_pool}'")
    if getattr(model, "reg_token", None) is not None:
        problems.append("register tokens")
    if getattr(model, "no_embed_class", False):
        problems.append("no_embed_class (DeiT-3 style)")
    if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
        problems.append("LayerScale")
    if not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity):
        problems.append("qk_norm")
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        problems.append("fc_norm")
    if problems:
        raise ValueError(f"{name} uses {', '.join(problems)}, which PrunableViT does not support; "
                         f"supported: DeiT / ViT with class token and learned position embedding")
