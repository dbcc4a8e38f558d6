"""timm entry points: `timm.create_model("nvit_deit_tiny_patch16_224")` builds a PrunableViT.

`pretrained=True` pulls timm's DeiT weights (needs the network); offline, pass timm's
`checkpoint_path=` with a timm-layout DeiT checkpoint, which loads directly.
"""

from __future__ import annotations

from timm.models import register_model

from .convert import from_timm
from .dims import ViTDims, revit_dims
from .vit import PrunableViT

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
