"""oViT's sparsity sweep in one training run: prune to a level, fine-tune with the zeros held fixed,
save that model, prune further from it, and so on."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ..oneshot import sparse_path, write_sparse
from ..pruning.block_distill import BlockDistillation
from ..sparsity import Sparsifier
from ..sparsity.distill import SparseReconstruction, distill_sparse

log = logging.getLogger(__name__)


class SparsitySweep(L.Callback):
    """Sparsify the student of an `NViTModule` to each level of `sparsifier.sparsities` in turn.

    The first level is reached before the first step; each level is then fine-tuned for
    `steps_per_level` optimizer steps with its zeros fixed (gradients masked before every step,
    weights re-masked after it, so neither momentum nor weight decay revives them), saved to
    `save_dir/sparsity_<s>` and, with a checkpoint, used as the starting point of the next level.
    With `distillation` (a `SparseReconstruction`: the masked refit and / or block distillation, or a
    bare `BlockDistillation`), each level's sparse model is first reconstructed towards `reference`
    (the dense model) on `distill_batches`, its zeros held (`sparsity/distill.py`), then fine-tuned.
    The sparsifier (and the distillation) run on rank 0 and the weights are broadcast, so every DDP
    rank holds the same masks. Level, masks and saved models live in the checkpoint: a resumed run
    continues mid-sweep.
    """

    def __init__(self, sparsifier: Sparsifier, batches: Iterable[tuple[Tensor, Tensor]], steps_per_level: int,
                 save_dir: str, checkpoint_dir: str | None = None,
                 distillation: SparseReconstruction | BlockDistillation | None = None,
                 reference: nn.Module | None = None,
                 distill_batches: Iterable[tuple[Tensor, Tensor]] | None = None) -> None:
        super().__init__()
        if steps_per_level < 1:
            raise ValueError(f"sweep.steps_per_level must be >= 1, got {steps_per_level}")
        if distillation is not None and (reference is None or distill_batches is None):
            raise ValueError("a sweep with block distillation needs the dense reference and calibration batches")
        if sparsifier.nm is not None:
            raise ValueError(f"a sparsity sweep needs unstructured sparsity; {sparsifier.pattern} is one level: "
                             f"use prune.py pruner.pattern={sparsifier.pattern}")
        self.sparsifier, self.batches, self.steps_per_level = sparsifier, batches, int(steps_per_level)
        self.levels = list(sparsifier.sparsities)
        self.save_dir = Path(save_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.distillation, self.reference, self.distill_batches = distillation, reference, distill_batches
        self.level = -1  # index into `levels` of the level being fine-tuned
        self.masks: dict[str, Tensor] = {}  # layer name -> 1 where the weight is kept
        self.saved: dict[float, str] = {}

    @property
    def total_steps(self) -> int:
        return len(self.levels) * self.steps_per_level

    @property
    def done(self) -> bool:
        return len(self.saved) == len(self.levels)

    # ---- the sweep ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.level < 0:
            self._sparsify(trainer, pl_module.student, 0)
        self._apply_masks(pl_module.student)  # a resumed run: the checkpoint's masks, exactly

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        layers = self.sparsifier.layers(pl_module.student)
        for name, mask in self.masks.items():
            grad = layers[name].weight.grad
            if grad is not None:
                grad.mul_(mask.to(grad.device))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._apply_masks(pl_module.student)
        if self.done or trainer.global_step < (self.level + 1) * self.steps_per_level:
            return
        level = self.levels[self.level]
        if trainer.is_global_zero:
            write_sparse(pl_module.student, self.save_dir, level)
            log.info(f"sparsity {level:.2f} fine-tuned for {self.steps_per_level} steps -> "
                     f"{sparse_path(self.save_dir, level)}")
        self.saved[level] = str(sparse_path(self.save_dir, level))
        if self.done:
            trainer.should_stop = True
        else:
            self._sparsify(trainer, pl_module.student, self.level + 1)
        if self.checkpoint_dir is not None:  # a sweep interrupted later resumes from here
            trainer.save_checkpoint(str(self.checkpoint_dir / "last.ckpt"))

    def _sparsify(self, trainer: L.Trainer, student: nn.Module, index: int) -> None:
        level = self.levels[index]
        state = None
        if trainer.is_global_zero:
            one_level = copy.copy(self.sparsifier)
            one_level.sparsities = [level]
            sparse = one_level(copy.deepcopy(student).eval(), batches=self.batches)[level]
            if self.distillation is not None:  # trains every block parameter, so the whole state travels
                report = distill_sparse(self.distillation, sparse, self.reference, self.distill_batches,
                                        list(self.sparsifier.layers(sparse)), next(student.parameters()).device)
                log.info(f"sparsity {level:.2f}: reconstruction in {report['seconds']} s")
            state = {name: value.detach().cpu() for name, value in sparse.state_dict().items()}
        state = trainer.strategy.broadcast(state, src=0)
        student.load_state_dict(state)
        layers = self.sparsifier.layers(student)
        self.masks = {name: (layer.weight != 0).to(layer.weight.dtype).detach() for name, layer in layers.items()}
        self.level = index
        kept = sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())
        log.info(f"sparsified to {level:.2f} (achieved {1 - kept:.3f}); fine-tuning {self.steps_per_level} steps")

    def _apply_masks(self, student: nn.Module) -> None:
        layers = self.sparsifier.layers(student)
        with torch.no_grad():
            for name, mask in self.masks.items():
                layers[name].weight.mul_(mask.to(layers[name].weight.device))

    # ---- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "masks": {k: v.cpu() for k, v in self.masks.items()},
                "saved": dict(self.saved), "levels": list(self.levels)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["levels"]) != self.levels:
            raise ValueError(f"the checkpoint is a sweep over {state_dict['levels']}, not pruner.sparsities="
                             f"{self.levels}: resume with the same levels")
        self.level, self.masks, self.saved = state_dict["level"], state_dict["masks"], dict(state_dict["saved"])
