"""The timm ViT families PrunableViT imports, prunes and compacts exactly: one entry per family, the
list tests and tools iterate over (add a family here once `from_timm` reproduces it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .structure import KINDS

# a 2-block, 48-wide model on 32x32 images: every family's features at test speed
SMALL = dict(depth=2, embed_dim=48, num_heads=3, img_size=32, patch_size=8)


@dataclass(frozen=True)
class Family:
    """A timm ViT family: a real timm model name of it, the extra timm arguments that make it (when
    the name alone does not), the PrunableViT features its import must turn on, and the prunable
    kinds it allows."""

    name: str
    timm_name: str
    features: dict = field(default_factory=dict)
    timm_kwargs: dict = field(default_factory=dict)
    kinds: tuple[str, ...] = KINDS

    def create_timm(self, small: bool = True, **kwargs: object) -> nn.Module:
        """The timm model with random weights (no network); `small` shrinks it to `SMALL`."""
        import timm

        return timm.create_model(self.timm_name, pretrained=False,
                                 **{**self.timm_kwargs, **(SMALL if small else {}), **kwargs})


FAMILIES = {f.name: f for f in (
    Family("deit", "deit_tiny_patch16_224"),
    Family("deit_distilled", "deit_tiny_distilled_patch16_224", {"distilled": True}),
    Family("vit_augreg", "vit_tiny_patch16_224"),
    Family("vit_reg_gap", "vit_base_patch16_reg4_gap_256",
           {"global_pool": "avg", "class_token": False, "reg_tokens": 4, "no_embed_class": True}),
    Family("deit3", "deit3_small_patch16_224", {"init_values": 1e-6, "no_embed_class": True}),
    Family("dinov2", "vit_small_patch14_dinov2", {"init_values": 1e-5}),
    Family("dinov2_reg", "vit_small_patch14_reg4_dinov2",
           {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True}),
    Family("clip", "vit_base_patch16_clip_224", {"pre_norm": True, "norm_eps": 1e-5}),
    Family("vit_qk_norm", "vit_small_patch16_224", {"qk_norm": True}, {"qk_norm": True}),
)}
