"""Builders the Hydra configs point at (`_target_`), with one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .models import PrunableViT, ViTDims, from_timm


def build_model(timm_name: str | None = None, checkpoint: str | None = None, pretrained: bool = False,
                pretrained_dir: str | None = None, dims: dict | None = None, num_classes: int | None = None,
                **model_kwargs: object) -> PrunableViT:
    """A masked (prunable) PrunableViT from exactly one source:

    - `pretrained_dir`: a `save_pretrained` directory (e.g. a snapshot of an earlier run);
    - `timm_name` + `checkpoint`: a timm DeiT/ViT and a local timm-layout checkpoint file;
    - `timm_name` + `pretrained=True`: timm's hub weights (needs the network);
    - `dims` (+ PrunableViT kwargs such as img_size): random initialisation.

    `num_classes`: the classifier's classes. A loaded model whose head has another count gets a new,
    freshly initialised head (`reset_classifier`, as timm does for transfer); None keeps its head.
    With `pretrained_dir`, `timm_name` only names the timm model timed beside it (`measure_latency`).
    """
    if num_classes is not None and int(num_classes) < 1:
        raise ValueError(f"model.num_classes must be >= 1 (or null: keep the checkpoint's head), got {num_classes}")
    if dims is not None and not pretrained_dir:
        return PrunableViT(ViTDims.from_dict(dict(dims)), num_classes=num_classes or 1000, **model_kwargs)
    model = _load_model(timm_name, checkpoint, pretrained, pretrained_dir, **model_kwargs)
    if num_classes is not None and int(num_classes) != model.num_classes:
        model.reset_classifier(int(num_classes))
    return model


def _load_model(timm_name: str | None, checkpoint: str | None, pretrained: bool, pretrained_dir: str | None,
                **model_kwargs: object) -> PrunableViT:
    if pretrained_dir:
        if not Path(pretrained_dir).is_dir():
            raise FileNotFoundError(f"model directory not found: {pretrained_dir} (set model.pretrained_dir)")
        model = PrunableViT.from_pretrained(pretrained_dir)
        return model if model.masked else model.with_masks()
    if timm_name is None:
        raise ValueError("model config needs one of pretrained_dir, timm_name or dims")
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (set model.checkpoint=<file>, or "
                                f"model.pretrained=true with a network)")
    return from_timm(timm_name, checkpoint_path=checkpoint, pretrained=pretrained, **model_kwargs)


def build_cnn_teacher(timm_name: str, checkpoint: str | None = None, pretrained: bool = False) -> nn.Module:
    """A timm CNN (e.g. regnety_160) for DeiT's hard distillation through the distillation token."""
    import timm

    if not timm.is_model(timm_name):
        raise ValueError(f"unknown timm model '{timm_name}' for distill.cnn_teacher")
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"CNN teacher checkpoint not found: {checkpoint} (distill.cnn_teacher.checkpoint)")
    return timm.create_model(timm_name, pretrained=pretrained and not checkpoint,
                             checkpoint_path=checkpoint or "")
