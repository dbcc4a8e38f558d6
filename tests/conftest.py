from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nvit_lightning.models import FAMILIES, PrunableViT, ViTDims

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
DEIT_TINY_CKPT = DATA / "deit_tiny_pipevit" / "deit_tiny_patch16_224_pipevit.pth"
VAL_DIR = DATA / "imagenet_val_subset_acuity1300"
SAMPLE_DIR = DATA / "imagenet_sample_1000"

needs_deit_tiny = pytest.mark.skipif(not DEIT_TINY_CKPT.is_file(), reason="no DeiT-Tiny checkpoint in data/")
needs_imagenet_samples = pytest.mark.skipif(
    not (VAL_DIR.is_dir() and SAMPLE_DIR.is_dir()), reason="no ImageNet samples in data/")


def tiny_vit(distilled: bool = False, seed: int = 0, **kwargs: object) -> PrunableViT:
    """A 2-block ViT on 32x32 images: fast enough to differentiate through in every test."""
    torch.manual_seed(seed)
    dims = ViTDims(48, (3, 2), (16, 8), (8, 16), (64, 96))
    return PrunableViT(dims, img_size=32, patch_size=8, num_classes=10, distilled=distilled, **kwargs).eval()


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


def random_masks(model: PrunableViT, seed: int = 0, keep: float = 0.6) -> None:
    """Random masks over all five kinds, whole heads and EMB channels included (never a whole layer)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, mask in model.masks().items():
            drop = torch.rand(mask.numel(), generator=generator) > keep
            drop[torch.randint(mask.numel(), (1,), generator=generator)] = False  # keep one alive
            mask[drop] = 0


def assert_pruned_slices_zero(model: PrunableViT) -> None:
    """Every parameter slice of a masked unit is exactly zero (nothing revived it)."""
    from nvit_lightning.pruning import Structure

    structure = Structure(model, group_sizes=dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1))
    for spec in structure.param_axes:
        viewed = model.get_parameter(spec.name).detach().view(spec.view)
        for key, axis in spec.axes.items():
            dead = (structure.layers[key].mask == 0).nonzero().flatten()
            assert viewed.index_select(axis, dead).abs().sum() == 0, (spec.name, key)


def block_outputs(model: PrunableViT, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The residual stream after every block, over all images."""
    outs: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    with torch.no_grad():
        for x in images:
            x = model.embed(x)
            for i, block in enumerate(model.blocks):
                x = block(x, model.emb_mask_or_none)
                outs[i].append(x)
    return [torch.cat(o) for o in outs]


def family_timm_model(family: str, **kwargs: object) -> nn.Module:
    """The family's small timm model with every parameter randomised: LayerScale gains, tokens and
    norms away from their init (gains of 1e-5 would hide almost every block)."""
    torch.manual_seed(0)
    # a classifier even for backbones (DINOv2 has none): a masked backbone's features keep pruned zeros
    model = FAMILIES[family].create_timm(**{"num_classes": 1000, **kwargs}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model
