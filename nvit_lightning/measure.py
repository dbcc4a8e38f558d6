"""Accuracy and latency of the models a run reports: top-1 / top-5 on data.val, size and predicted
latency, and the fresh-process timing of pruned, dense and timm's dense models side by side."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .app import work_device
from .evaluation import evaluate
from .latency.models import LatencyModel
from .latency.timing import prunable_spec, ratio_uncertainty, time_in_fresh_process, timm_spec
from .models import PrunableViT
from .report import model_entry
from .sparsity import Sparsifier, layer_sparsity

log = logging.getLogger("nvit_lightning")

MAX_RATIO_IQR = 0.2  # spread of a measurement's per-round speed-ups above which it is flagged


def val_accuracy(model: torch.nn.Module, datamodule: Any, cfg: DictConfig, name: str) -> dict[str, float]:
    """Top-1 / top-5 on data.val; empty with `evaluate=false`, without a validation set or a classifier."""
    if not cfg.evaluate or datamodule.val_spec is None or getattr(model, "num_classes", None) == 0:
        return {}
    return evaluate(model, datamodule.val_dataloader(), work_device(cfg), desc=f"evaluate {name}")


def describe_model(model: PrunableViT, latency_model: LatencyModel, datamodule: Any, cfg: DictConfig,
                   name: str, with_dims: bool) -> dict[str, Any]:
    """The report entry of one model: size, predicted latency, accuracy on data.val (measured latency
    comes later, from `measure_side_by_side`)."""
    return model_entry(model, latency_model, None, val_accuracy(model, datamodule, cfg, name) or None, with_dims)


def calibration_data(pruner: Any, datamodule: Any, calib_batches: int, at_least: int = 0) -> tuple[int, Any]:
    """How many calibration batches `pruner` reads (`Pruner.calibration_batches`, from the run's
    `calib_batches`) and the batches themselves, at least `at_least` of them (the refit's): data.train's
    fixed random calibration subset, eval transform, the same images on every pass; none for 0."""
    reads = pruner.calibration_batches(calib_batches, datamodule.batch_size)
    num_batches = max(reads, at_least)
    return reads, datamodule.calib_dataloader(num_batches) if num_batches > 0 else []


def describe_sparse(model: PrunableViT, sparsifier: Sparsifier, level: float, path: str | Path, datamodule: Any,
                    cfg: DictConfig) -> dict[str, Any]:
    """The report entry of one sparse model: requested and achieved sparsity (over the sparsified
    layers), its directory, accuracy on data.val, the sparsity of each layer."""
    achieved, layers = layer_sparsity(model, list(sparsifier.layers(model)))
    return {"sparsity": level, "achieved": achieved, "dir": str(path),
            **val_accuracy(model, datamodule, cfg, f"sparsity {level:.2f}"), "layers": layers}


def measure_side_by_side(dense: PrunableViT | dict, pruned: PrunableViT, latency_model: LatencyModel,
                         cfg: DictConfig, others: dict[str, PrunableViT] | None = None) -> dict[str, Any] | None:
    """Measured ms of the pruned model, our dense model and timm's own dense model, timed together in
    a fresh process on the latency model's device, dtype, batch size and threads (`timing.py`).
    `dense` is the dense model or its `prunable_spec` (taken before pruning changed the model);
    `others` (e.g. the models of the other latency targets) are timed in the same rounds.
    A measurement whose per-round speed-ups disagree by more than `MAX_RATIO_IQR` (interquartile range
    over median) is taken again once, and flagged in the result if it still does."""
    if not cfg.measure_latency:
        return None
    setup = latency_model.timing
    if setup.device == "cuda" and not torch.cuda.is_available():
        log.warning(f"{latency_model.describe()} is for CUDA, but no GPU is visible: latency not measured")
        return None
    dense_spec = dense if isinstance(dense, dict) else prunable_spec(dense)  # or taken before pruning
    specs = {"dense": dense_spec, "pruned": prunable_spec(pruned)}
    timm_name = cfg.model.get("timm_name")
    if timm_name:
        specs["timm_dense"] = timm_spec(timm_name, num_classes=pruned.num_classes,
                                        **dict(cfg.model.get("timm_kwargs") or {}))
    references = [name for name in ("dense", "timm_dense") if name in specs]
    specs.update({name: prunable_spec(model) for name, model in (others or {}).items()})

    def uncertainty(result: dict[str, Any]) -> float:
        return max(ratio_uncertainty(result, "pruned", reference) for reference in references)

    log.info(f"timing dense and pruned models in a fresh process ({setup})")
    result = time_in_fresh_process(specs, setup)
    if uncertainty(result) > MAX_RATIO_IQR:
        log.warning(f"per-round speed-ups disagree (interquartile range {uncertainty(result):.0%} of the median): "
                    f"the machine is busy; measuring again")
        result = min(result, time_in_fresh_process(specs, setup), key=uncertainty)
    result["ratio_iqr"] = uncertainty(result)
    result["noisy"] = result["ratio_iqr"] > MAX_RATIO_IQR
    if result["noisy"]:
        log.warning(f"latency measurement is noisy (per-round speed-ups vary by {result['ratio_iqr']:.0%}); "
                    f"re-time on an idle machine")
    result["setup"] = asdict(setup)
    return result

