"""Import timm VisionTransformer / DeiT models into a PrunableViT (the `checkpoint_filter_fn` of this
project), or refuse, in one line naming the feature, what PrunableViT cannot reproduce."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .dims import ViTDims
from .vit import FEATURES, POOLS, PrunableViT, load_checked_state_dict


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
    return ViTDims(model.patch_embed.proj.out_channels, heads, head_dims, head_dims,
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
              num_classes: int | None = None, timm_kwargs: dict | None = None,
              **model_kwargs: object) -> PrunableViT:
    """A PrunableViT with the weights of a timm VisionTransformer / DeiT, computing the same function.

    `source` is a timm model, a timm model name (weights from `checkpoint_path`, or from the hub with
    `pretrained=True`, which needs the network), or a timm-layout DeiT state dict (then `num_heads` is
    required). `num_classes` different from the source's gives a new classifier (`reset_classifier`).
    `timm_kwargs` go to `timm.create_model` with a name (e.g. `img_size`, or `depth` for a small test).
    Extra keyword arguments (e.g. `drop_path_rate`) go to PrunableViT. A timm feature PrunableViT
    does not reproduce is refused with one ValueError naming it (`unsupported_features`).
    """
    import timm

    if isinstance(source, str):
        if not timm.is_model(source):
            raise ValueError(f"unknown timm model '{source}' (see timm.list_models('deit*'))")
        state = load_state_dict_file(checkpoint_path) if checkpoint_path else None
        source_model = timm.create_model(source, pretrained=pretrained and state is None, **dict(timm_kwargs or {}))
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
        model = PrunableViT(dims, masked=masked, **{**timm_model_config(source, dims), **model_kwargs})
        load_checked_state_dict(model, source.state_dict(), type(source).__name__)
    elif num_heads is None:
        raise ValueError("from_timm(state_dict) needs num_heads: it cannot be read off the shapes")
    else:
        model = from_timm_state_dict(source, num_heads, masked, **model_kwargs)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def timm_model_config(model: nn.Module, dims: ViTDims) -> dict:
    """PrunableViT arguments (all but dims) reproducing a supported timm VisionTransformer."""
    pe, block = model.patch_embed, model.blocks[0]
    global_pool = model.global_pool
    fc_norm = not isinstance(model.fc_norm, nn.Identity)
    # the scale the module really applies: fused attention uses 1/sqrt(its actual head dim)
    scale_dims = [qk if b.attn.fused_attn else round(b.attn.scale ** -2) for b, qk in zip(model.blocks, dims.qk)]
    config = dict(
        img_size=pe.img_size[0], patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, distilled=getattr(model, "dist_token", None) is not None,
        qkv_bias=block.attn.qkv.bias is not None, attn_scale_dims=scale_dims, global_pool=global_pool,
        # None where timm's default placement (after pooling for avg/max pools) is what the model has
        fc_norm=None if fc_norm == (global_pool in ("avg", "avgmax", "max")) else fc_norm,
        class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        # LayerScale's initial value only matters when training from scratch: the gammas are loaded
        init_values=None if isinstance(block.ls1, nn.Identity) else float(getattr(block.ls1, "init_values", 1e-5)),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity), norm_eps=block.norm1.eps,
        pretrained_cfg=dict(getattr(model, "pretrained_cfg", None) or {}) or None,
    )
    return {k: v for k, v in config.items() if k not in FEATURES or v != FEATURES[k]}


def _check_supported(model: nn.Module) -> None:
    problems = unsupported_features(model)
    if problems:
        raise ValueError(f"{type(model).__name__} uses {'; '.join(problems)}, which PrunableViT does not "
                         f"reproduce (supported: {SUPPORTED})")


SUPPORTED = ("timm VisionTransformer / DeiT with class, distillation or register tokens, learned position "
             "embedding, token or avg/max pooling, fc_norm, LayerScale, pre_norm, qk_norm, LayerNorm, GELU MLP")


def unsupported_features(model: nn.Module) -> list[str]:
    """The features of a timm model that PrunableViT cannot reproduce exactly (empty: supported)."""
    from timm.layers import Attention as TimmAttention
    from timm.layers import LayerScale as TimmLayerScale
    from timm.layers import Mlp as TimmMlp
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer

    problems = []
    blocks = list(getattr(model, "blocks", []))
    if getattr(model, "rope", None) is not None or any(getattr(b.attn, "rope", None) is not None
                                                        for b in blocks if hasattr(b, "attn")):
        problems.append("rotary position embeddings (rope)")
    if getattr(model, "attn_pool", None) is not None:
        problems.append(f"attention pooling (global_pool='{model.global_pool}')")
    if any(getattr(b, "window_size", 0) for b in blocks):
        problems.append("windowed attention")
    if any(_is_swiglu(getattr(b, "mlp", None)) for b in blocks):
        problems.append("SwiGLU MLP")
    if problems or not isinstance(model, VisionTransformer) or not blocks:
        return problems or [f"model class {type(model).__name__} (not a timm VisionTransformer)"]
    pool = getattr(model, "global_pool", "token")
    if pool not in POOLS:
        problems.append(f"global_pool='{pool}'")
    for flag, what in (("pool_include_prefix", "pool_include_prefix=True"),
                       ("dynamic_img_size", "dynamic_img_size=True")):
        if getattr(model, flag, False):
            problems.append(what)
    if model.pos_embed is None:
        problems.append("no position embedding (pos_embed='none')")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        problems.append("patch dropout")
    pe = model.patch_embed
    if type(pe) is not TimmPatchEmbed or not isinstance(pe.norm, nn.Identity) or pe.dynamic_img_pad:
        problems.append("a patch embedding other than timm's plain PatchEmbed")
    elif len(set(pe.img_size)) > 1 or len(set(pe.patch_size)) > 1:
        problems.append("non-square images or patches")
    elif (pe.proj.bias is None) != (not isinstance(model.norm_pre, nn.Identity)):
        problems.append("a patch embedding bias that does not follow pre_norm")
    if isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity):
        problems.append("final_norm=False")
    if getattr(model, "dist_token", None) is not None and model.reg_token is not None:
        problems.append("a distillation token with register tokens")
    for i, b in enumerate(blocks):
        block_problems = []
        if type(b) is not TimmBlock:
            block_problems.append(f"block type {type(b).__name__}")
        elif type(b.attn) is not TimmAttention:
            block_problems.append(f"attention type {type(b.attn).__name__}")
        elif type(b.mlp) is not TimmMlp:
            block_problems.append(f"MLP type {type(b.mlp).__name__}")
        else:
            a, m = b.attn, b.mlp
            if not isinstance(a.norm, nn.Identity):
                block_problems.append("scale_attn_norm")
            if getattr(a, "gate", None) is not None:
                block_problems.append("gated attention")
            if a.proj.bias is None or m.fc1.bias is None or m.fc2.bias is None:
                block_problems.append("proj_bias=False")
            if not isinstance(m.norm, nn.Identity):
                block_problems.append("scale_mlp_norm")
            if type(m.act) is not nn.GELU or m.act.approximate != "none":
                block_problems.append(f"activation {m.act}")
            if any(not isinstance(ls, nn.Identity | TimmLayerScale) for ls in (b.ls1, b.ls2)):
                block_problems.append("a LayerScale other than timm's")
            if isinstance(b.ls1, nn.Identity) != isinstance(blocks[0].ls1, nn.Identity):
                block_problems.append("LayerScale in some blocks only")
        if block_problems:  # every block is built alike: naming the first one's is enough
            problems += [f"{p} (blocks.{i})" for p in block_problems]
            break
    problems += _norm_problems(model)
    return problems


def _is_swiglu(mlp: nn.Module | None) -> bool:
    return mlp is not None and ("SwiGLU" in type(mlp).__name__ or "GluMlp" in type(mlp).__name__)


def _norm_problems(model: nn.Module) -> list[str]:
    """PrunableViT's norms are LayerNorms with a weight and a bias and one eps for the whole model."""
    norms = [model.norm_pre, model.norm, model.fc_norm]
    for b in model.blocks:
        norms += [b.norm1, b.norm2, getattr(b.attn, "q_norm", nn.Identity()), getattr(b.attn, "k_norm", nn.Identity())]
    norms = [n for n in norms if not isinstance(n, nn.Identity)]
    kinds = sorted({type(n).__name__ for n in norms if not isinstance(n, nn.LayerNorm)})
    if kinds:
        return [f"norm layer {', '.join(kinds)}"]
    if any(n.weight is None or n.bias is None for n in norms):
        return ["LayerNorm without weight or bias"]
    if len({n.eps for n in norms}) > 1:
        return [f"several LayerNorm eps ({sorted({n.eps for n in norms})})"]
    return []
