"""Slow tests on the real DeiT-Tiny weights and real ImageNet images (`make test-slow`)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.data import DataLoader

from nvit_lightning.data import ImageListDataset, eval_transform, first_n
from nvit_lightning.evaluation import evaluate
from nvit_lightning.models import from_timm

from .conftest import DEIT_TINY_CKPT, VAL_DIR, needs_deit_tiny, needs_imagenet_samples

pytestmark = [pytest.mark.slow, needs_deit_tiny, needs_imagenet_samples]


def _val_loader(n: int) -> DataLoader:
    return DataLoader(first_n(ImageListDataset(VAL_DIR, "dataset.txt", eval_transform()), n), batch_size=50)


def test_real_deit_tiny_matches_timm_accuracy_on_200_val_images() -> None:
    torch.set_num_threads(2)
    loader = _val_loader(200)
    reference = timm.create_model("deit_tiny_patch16_224", checkpoint_path=str(DEIT_TINY_CKPT))
    ours = from_timm("deit_tiny_patch16_224", checkpoint_path=DEIT_TINY_CKPT)
    ref_acc, our_acc = evaluate(reference, loader), evaluate(ours, loader)
    print(f"top-1 on 200 val images: timm {ref_acc['top1']:.2f} %, PrunableViT {our_acc['top1']:.2f} %")
    assert abs(ref_acc["top1"] - our_acc["top1"]) <= 0.2
    assert our_acc["top1"] > 70.0  # the weights are real (81.6 % on all 1300)
    compact = ours.compact()  # full masks: compaction is the identity
    assert evaluate(compact, loader) == our_acc
