"""Architecture report: kept heads / QK / V / MLP per block and EMB over pruning events."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from .pruning import GlobalPruning


def plot_architecture(history: Sequence[dict[str, Any]], dense_dims: dict, path: str | Path) -> Path:
    """One PNG: per-block widths of the final architecture vs dense, and EMB / latency over events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = history[-1]["dims"] if history else dense_dims
    blocks = range(len(dense_dims["heads"]))
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for ax, kind, label in zip(axes, ("heads", "qk", "v", "mlp"), ("heads", "QK / head", "V / head", "MLP")):
        ax.bar(blocks, dense_dims[kind], color="lightgray", label="dense")
        ax.bar(blocks, final[kind], color="tab:blue", label="pruned")
        ax.set_title(f"{label} per block")
        ax.set_xlabel("block")
    axes[0].legend()
    ax = axes[4]
    steps = [0] + [h["step"] for h in history]
    ax.plot(steps, [1.0] + [h["latency_ratio"] for h in history], marker=".", label="latency ratio")
    ax.plot(steps, [1.0] + [h["dims"]["emb"] / dense_dims["emb"] for h in history], marker=".",
            label="EMB ratio")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"EMB {final['emb']} / {dense_dims['emb']}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class ArchitectureReport(L.Callback):
    """Writes `architecture.png` into `out_dir` when pruning training ends (and logs it to W&B)."""

    def __init__(self, out_dir: str, filename: str = "architecture.png") -> None:
        self.path = Path(out_dir) / filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = next((c for c in trainer.callbacks if isinstance(c, GlobalPruning)), None)
        if pruning is None or not trainer.is_global_zero:
            return
        dense = pl_module.student.dims.to_dict()
        path = plot_architecture(pruning.history, dense, self.path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="architecture", images=[str(path)])
