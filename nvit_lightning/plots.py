"""The PNGs a run writes: the pruned architecture against the dense one, and top-1 against latency
(the targets of one run, or the jobs of a sweep)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def plot_architecture(dense_dims: Mapping[str, Any], pruned_dims: Mapping[str, Any], path: str | Path,
                      history: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Per-block heads, QK / V per head and MLP of the pruned model over the dense ones, and EMB;
    with a pruning `history` (events of `pruner=gradual`), latency and EMB ratios over the steps."""
    from .models.structure import KIND_SPECS

    plt = _pyplot()
    depth = len(dense_dims["heads"])
    per_block = [k.dims_field for k in KIND_SPECS if k.per_block]
    fig, axes = plt.subplots(1, len(per_block) + 1, figsize=(4 * len(per_block) + 4, 3.6))
    for ax, field in zip(axes, per_block):
        ax.bar(range(depth), dense_dims[field], color="lightgray", label="dense")
        ax.bar(range(depth), pruned_dims[field], color="tab:blue", label="pruned")
        ax.set_xticks(range(depth))  # blocks are whole numbers
        ax.set_title(f"{field} per block" if field in ("heads", "mlp") else f"{field} per head, per block")
        ax.set_xlabel("block")
    axes[0].legend()
    ax = axes[-1]
    if history:
        by_step = all("step" in h for h in history)  # pruning while training; one-shot events have no step
        steps = [0] + [h["step"] if by_step else h["event"] + 1 for h in history]
        ax.plot(steps, [1.0] + [h["latency_ratio"] for h in history], marker=".", label="latency ratio")
        ax.plot(steps, [1.0] + [h["dims"]["emb"] / dense_dims["emb"] for h in history], marker=".",
                label="EMB ratio")
        ax.set_xlabel("optimizer step" if by_step else "pruning event")
        ax.set_ylim(0, 1.05)
        ax.legend()
    else:
        ax.bar([0, 1], [dense_dims["emb"], pruned_dims["emb"]], color=["lightgray", "tab:blue"])
        ax.set_xticks([0, 1], ["dense", "pruned"])
    ax.set_title(f"EMB {pruned_dims['emb']} / {dense_dims['emb']}")
    return _save(fig, path)


def plot_accuracy_latency(points: Sequence[Mapping[str, Any]], path: str | Path, title: str,
                          xlabel: str = "latency (fraction of the dense model)") -> Path:
    """Top-1 against latency, one labelled marker per point (`latency`, `top1`, `label`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = sorted(points, key=lambda p: p["latency"])
    ax.plot([p["latency"] for p in points], [p["top1"] for p in points], marker="o")
    for p in points:
        ax.annotate(str(p["label"]), (p["latency"], p["top1"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
