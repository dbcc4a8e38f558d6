"""Accuracy of a model, as reported in report.json (latency: `timing.py`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
             desc: str = "eval") -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent over the whole loader (the model's train/eval mode is kept)."""
    was_training = model.training
    model = model.eval().to(device)
    correct1 = correct5 = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False):
        images, labels = images.to(device), labels.to(device)
        top5 = model(images).topk(min(5, model.num_classes), dim=-1).indices  # B, 5
        hits = top5 == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(-1).sum())
        total += labels.numel()
    model.train(was_training)
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1)}
