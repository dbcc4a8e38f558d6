"""timm entry points.

`nvit_vit` is the architecture of every model `PrunableViT.save_pretrained` writes (its
`config.json` names it): `timm.create_model("local-dir:<dir>", pretrained=True)` or
`timm.create_model("nvit_vit", pretrained=True, pretrained_cfg_overlay=dict(file="<dir>/model.safetensors"))`
build it from the directory alone, offline.

`timm.create_model("nvit_deit_tiny_patch16_224")` builds a dense DeiT as a PrunableViT;
`pretrained=True` pulls timm's DeiT weights (needs the network); offline, pass timm's
`checkpoint_path=` with a timm-layout DeiT checkpoint, which loads directly.
"""

from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .convert import from_timm
from .dims import ViTDims, revit_dims
from .vit import ARCHITECTURE, CONFIG_FILE, PrunableViT, default_pretrained_cfg, read_model_args, to_own_layout

# timm's factory passes these to every entry point; they mean nothing here
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

DEIT_VARIANTS = {  # timm name: (emb, depth, heads, distilled)
    "deit_tiny_patch16_224": (192, 12, 3, False),
    "deit_small_patch16_224": (384, 12, 6, False),
    "deit_base_patch16_224": (768, 12, 12, False),
    "deit_base_distilled_patch16_224": (768, 12, 12, True),
}


def _create(timm_name: str, pretrained: bool, **kwargs: object) -> PrunableViT:
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    if pretrained:
        return from_timm(timm_name, pretrained=True, **kwargs)
    emb, depth, heads, distilled = DEIT_VARIANTS[timm_name]
    return PrunableViT(ViTDims.uniform(emb, depth, heads), distilled=distilled, **kwargs)


@register_model
def nvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: object) -> PrunableViT:
    return _create("deit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def nvit_deit_small_patch16_224(pretrained: bool = False, **kwargs: object) -> PrunableViT:
    return _create("deit_small_patch16_224", pretrained, **kwargs)


@register_model
def nvit_deit_base_patch16_224(pretrained: bool = False, **kwargs: object) -> PrunableViT:
    return _create("deit_base_patch16_224", pretrained, **kwargs)


@register_model
def nvit_deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs: object) -> PrunableViT:
    return _create("deit_base_distilled_patch16_224", pretrained, **kwargs)


@register_model
def nvit_revit_patch16_224(pretrained: bool = False, emb: int = 384, **kwargs: object) -> PrunableViT:
    """ReViT: NViT's redistributed architecture built from the embedding width alone."""
    if pretrained:
        raise ValueError("ReViT has no pretrained weights; train it from scratch")
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    return PrunableViT(revit_dims(emb), **kwargs)


default_cfgs = generate_default_cfgs({ARCHITECTURE: dict(
    input_size=(3, 224, 224), fixed_input_size=True, interpolation="bicubic", crop_pct=0.9,
    first_conv="patch_embed.proj", classifier="head", license="apache-2.0")})


@register_model
def nvit_vit(pretrained: bool = False, **kwargs: object) -> PrunableViT:
    """A (pruned) PrunableViT described by `model_args` (what `config.json` holds); with only a weights
    file (`pretrained_cfg_overlay=dict(file=...)`), the `config.json` beside it describes it."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    if "dims" not in kwargs:
        config_path = _config_beside(overlay.get("file") or _cfg_get(pretrained_cfg, "file"))
        if config_path is None:
            raise ValueError("nvit_vit needs its dims: load a directory written by PrunableViT.save_pretrained "
                             "(timm.create_model('local-dir:<dir>', pretrained=True))")
        saved = read_model_args(config_path)
        saved_cfg = saved.pop("pretrained_cfg", None) or default_pretrained_cfg(saved)
        kwargs = {**saved, **kwargs}
        overlay = {**{k: v for k, v in saved_cfg.items() if k != "architecture"}, **overlay}
    return build_model_with_cfg(PrunableViT, ARCHITECTURE, pretrained, pretrained_cfg=pretrained_cfg,
                                pretrained_cfg_overlay=overlay, pretrained_filter_fn=_checkpoint_filter, **kwargs)


def _checkpoint_filter(state_dict: dict, model: PrunableViT) -> dict:
    return to_own_layout(state_dict, model.state_dict())


def _cfg_get(cfg: object, key: str) -> object:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def _config_beside(file: object) -> Path | None:
    """The config.json of a save_pretrained directory, from the directory or its weights file."""
    if not file:
        return None
    path = Path(str(file))
    path = path / CONFIG_FILE if path.is_dir() else path.parent / CONFIG_FILE
    return path if path.is_file() else None
