"""Reconstruction of a sparse model: a masked least-squares refit, then block distillation, with its
zeros held fixed.

A structurally pruned model is repaired in two steps (`conf/reconstruction/`): the least-squares
refit of whole layers on the kept structures (`pruning/reconstruct.py`), then block distillation
(`pruning/block_distill.py`). A sparse model gets the same two steps in their sparse form: the refit
solves each row of each sparse layer on its own surviving inputs (`refit.py`: a whole-layer solve
would refill the zeros), then the distillation trains every parameter of each block, biases and
LayerNorms included, against the dense block's output, with the pruned weights held at exactly zero
(N:M patterns stay N:M), and last the logit step (`logit_distill.py`) trains the biases and norms on
KL(dense ‖ sparse) of the logits. `reconstruction=sparse_refit` runs the refit, `block_distill` the
distillation, then the logit step (measured on held-out images: the refit before the distillation
made it worse; the logit step after it helped), `sparse_logits` the same with every setting its own,
and `least_squares` or `none` nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..models import PrunableViT
from ..pruning.block_distill import BlockDistillation
from ..pruning.interrupt import Checkpoint
from ..pruning.reconstruct import Reconstruction, image_batches
from .layers import weight_masks
from .logit_distill import LogitDistillation
from .refit import masked_refit

log = logging.getLogger("nvit_lightning")

@dataclass(frozen=True)
class SparseReconstruction:
    """The reconstruction of a sparse model: the masked refit of `layers` (of `qkv`, `proj`, `fc1`,
    `fc2`; empty: none) with `target` and `damping`, then `distillation` (None: none), then the
    end-to-end `logits` step (`logit_distill.py`; None: none), on `batches` calibration batches.
    `conf/reconstruction/sparse_refit.yaml` builds one directly; the structured configs map to one by
    `sparse_distillation`."""

    layers: Sequence[str] = ("proj", "fc1", "fc2")
    target: str = "reference"
    damping: float = 0.01
    batches: int = 16
    distillation: BlockDistillation | None = None
    logits: LogitDistillation | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        Reconstruction(self.layers or ("proj",), self.target, self.damping, self.batches)  # the same checks


def sparse_distillation(reconstruction: Reconstruction | SparseReconstruction | None) -> SparseReconstruction | None:
    """What a configured reconstruction does to a sparse model (None: nothing). `sparse_refit`: the
    masked refit; `block_distill`: the block distillation (on held-out images the refit before it
    lost: 70 %, 56.4 -> 44.6 % top-1), then the logit step with its measured settings
    (`LogitDistillation()`: held-out top-1 at 50 / 70 / 80 %, 74.0 / 56.4 / 27.6 -> 75.3 / 55.4 / 30.6,
    the KL to the dense logits lower at each), an unset `readout` / `lr` taking the sparse values
    (`BlockDistillation.for_model`); `least_squares`: nothing (its whole-layer refit would refill the
    zeros; the masked one is `sparse_refit`). `sparse_logits` (a `SparseReconstruction`) sets every
    step itself."""
    if reconstruction is None or isinstance(reconstruction, SparseReconstruction):
        return reconstruction
    if reconstruction.distillation is None:
        log.info("the least-squares refit of whole layers does not apply to sparse models (it would refill their "
                 "zeros): no reconstruction. reconstruction=sparse_refit refits each row on its kept weights, "
                 "reconstruction=block_distill trains each block with its zeros held")
        return None
    return SparseReconstruction(layers=(), batches=reconstruction.batches, distillation=reconstruction.distillation,
                                logits=LogitDistillation())


def distill_sparse(reconstruction: SparseReconstruction | BlockDistillation, sparse: PrunableViT,
                   dense: PrunableViT, batches: Iterable[Tensor | Sequence[Tensor]], layers: Sequence[str],
                   device: str | torch.device = "cpu", progress: bool = True,
                   checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Reconstruct the mask-free `sparse` model in place towards `dense` on calibration `batches`
    (images, or (images, labels)), every zero of the named sparse `layers` held: the masked refit,
    then the block distillation, then the logit step (a bare `BlockDistillation`: that alone). The
    report entry: wall seconds, each refit layer's relative error before / after, each block's
    before / after, the logit step's KL on the calibration images before / after. With `checkpoint`,
    the distillation saves every block and stops after it when asked (`BlockDistillation`)."""
    if isinstance(reconstruction, BlockDistillation):
        reconstruction = SparseReconstruction(layers=(), distillation=reconstruction)
    start = time.time()
    images = image_batches(batches)
    masks = weight_masks(sparse, list(layers))
    report: dict[str, Any] = {}
    if reconstruction.layers:
        fits = masked_refit(sparse, dense, images, reconstruction.layers, layers, reconstruction.target,
                            reconstruction.damping, device, progress)
        report["refit_seconds"] = round(time.time() - start, 1)
        report["refit_errors"] = {f.layer: [f.error_before, f.error_after] for f in fits}
    if reconstruction.distillation is not None:
        results = reconstruction.distillation(sparse, dense, images, device, progress, masks=masks,
                                              checkpoint=checkpoint.part("distillation") if checkpoint else None)
        report["block_errors"] = [[r.error_before, r.error_after] for r in results]
    if reconstruction.logits is not None:
        kl = reconstruction.logits(sparse, dense, images, device, progress, masks=masks)
        report["logit_kl"] = list(kl)  # on the calibration images, before / after
    log.info(f"sparse reconstruction in {time.time() - start:.0f} s")
    return {"seconds": round(time.time() - start, 1), **report}
