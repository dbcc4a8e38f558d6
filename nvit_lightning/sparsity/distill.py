"""Reconstruction of a sparse model: block distillation with its zeros held fixed.

A structurally pruned model is repaired in two steps (`conf/reconstruction/`): the least-squares
refit of whole layers on the kept structures (`pruning/reconstruct.py`), then block distillation
(`pruning/block_distill.py`). For a sparse model only the second applies: every row of a sparse layer
keeps its own set of inputs, so a refit of the whole layer would fill its zeros, and the per-row
least-squares compensation is what OBS's update already did (exactly, for a quadratic loss). The
distillation trains every parameter of each block, biases and LayerNorms included, against the
dense block's output, with the pruned weights held at exactly zero (N:M patterns stay N:M).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..models import PrunableViT
from ..pruning.block_distill import BlockDistillation
from ..pruning.reconstruct import Reconstruction, image_batches
from .layers import weight_masks

log = logging.getLogger("nvit_lightning")


def sparse_distillation(reconstruction: Reconstruction | None) -> BlockDistillation | None:
    """What of a configured reconstruction applies to a sparse model: its block distillation, alone
    (None without one: the least-squares refit alone is skipped, and says so)."""
    if reconstruction is not None and reconstruction.distillation is None:
        log.info("the least-squares refit does not apply to sparse models (it would refill their zeros; OBS "
                 "already compensated each row): no reconstruction. reconstruction=block_distill trains each "
                 "block with its zeros held")
    return None if reconstruction is None else reconstruction.distillation


def distill_sparse(distillation: BlockDistillation, sparse: PrunableViT, dense: PrunableViT,
                   batches: Iterable[Tensor | Sequence[Tensor]], layers: Sequence[str],
                   device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Tune the blocks of the mask-free `sparse` model in place towards `dense` on calibration
    `batches` (images, or (images, labels)), every zero of the named `layers` held; the report entry:
    wall seconds and each block's relative error before / after."""
    start = time.time()
    results = distillation(sparse, dense, image_batches(batches), device, progress,
                           masks=weight_masks(sparse, list(layers)))
    return {"seconds": round(time.time() - start, 1),
            "block_errors": [[r.error_before, r.error_after] for r in results]}
