"""Accuracy and measured latency of a model, as reported in report.json."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .models import PrunableViT
from .timing import measure_ms


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


def measure_latency(model: PrunableViT, batch_size: int, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, num_threads: int | None = None,
                    repeats: int = 10, rounds: int = 3) -> float:
    """Median ms of a forward of the compact model at `batch_size`, timed like the LUT profiler."""
    model = (model.compact() if model.masked else model).eval().to(device, dtype)
    size, chans = model.config["img_size"], model.config["in_chans"]
    images = torch.randn(batch_size, chans, size, size, device=device, dtype=dtype)
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return measure_ms(lambda: model(images), device, warmup=2, repeats=repeats, rounds=rounds)
    finally:
        torch.set_num_threads(old_threads)
