"""The LightningModule: a PrunableViT student, an optional frozen dense teacher, losses and metrics.

Pruning itself lives in `callbacks.GlobalPruning`; this module only knows that the KL term to the
dense teacher switches on after the first pruning event (`enable_kl`), as in NViT.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .models import PrunableViT, check_finite

log = logging.getLogger("nvit_lightning")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (more often than `max_nonfinite_skips` allows)."""


def check_training_options(kl_weight: float, temperatures: dict[str, float], max_nonfinite_skips: int) -> None:
    """Values that would only fail (or turn the loss into NaN) deep inside training."""
    if kl_weight < 0:
        raise ValueError(f"distill.kl_weight must be >= 0, got {kl_weight}")
    for key, value in temperatures.items():
        if kl_weight > 0 and not value > 0:
            raise ValueError(f"distill.{key} must be > 0, got {value}")
    if max_nonfinite_skips < 0:
        raise ValueError(f"max_nonfinite_skips must be >= 0, got {max_nonfinite_skips}")


def soft_distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) at temperature T, element-mean as in DeiT/NViT (so c_kl = 1e5 there)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                  reduction="sum", log_target=True)
    return kl * t * t / student.numel()


class NViTModule(L.LightningModule):
    def __init__(self, model: PrunableViT, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, kl_weight: float = 0.0,
                 temperature: float = 3.0, kl_from_start: bool = False,
                 teacher: nn.Module | None = None, label_smoothing: float = 0.0,
                 mixup: dict | None = None, cnn_teacher: nn.Module | None = None,
                 cnn_alpha: float = 0.5, max_nonfinite_skips: int = 0, stage: str = "prune",
                 step_offset: int = 0) -> None:
        super().__init__()
        check_training_options(kl_weight, {"temperature": temperature}, max_nonfinite_skips)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "teacher", "cnn_teacher"])
        self.student = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.kl_weight, self.temperature = kl_weight, temperature
        # the frozen dense model (by default a copy of the starting model); kept in a list so it stays
        # out of state_dict, the optimizer and DDP
        if kl_weight > 0 and teacher is None:
            teacher = copy.deepcopy(model)
        self._teacher = [teacher.eval().requires_grad_(False)] if kl_weight > 0 else []
        self.kl_active = kl_from_start
        # batches with a NaN/inf loss are skipped (no optimizer step) up to this many times, then the
        # run stops; 0 = stop at the first one
        self.max_nonfinite_skips, self.nonfinite_skips = max_nonfinite_skips, 0
        # metrics go under `<stage>/` on one step axis across stages: stage 2 continues where stage 1
        # stopped (a logged "step" is what Lightning's loggers use as the x-axis)
        self.stage, self.step_offset = stage, step_offset
        self._cnn_teacher = [cnn_teacher.eval().requires_grad_(False)] if cnn_teacher is not None else []
        if cnn_teacher is not None and not model.distilled:
            raise ValueError("a CNN teacher needs a distilled student (with a distillation token)")
        self.mixup = self._build_mixup(mixup, model.num_classes)
        n = model.num_classes
        self.train_top1 = MulticlassAccuracy(n, top_k=1)
        self.val_top1 = MulticlassAccuracy(n, top_k=1)
        self.val_top5 = MulticlassAccuracy(n, top_k=min(5, n))

    @staticmethod
    def _build_mixup(cfg: dict | None, num_classes: int):
        if not cfg or (cfg.get("mixup_alpha", 0) <= 0 and cfg.get("cutmix_alpha", 0) <= 0):
            return None
        from timm.data import Mixup

        return Mixup(num_classes=num_classes, **cfg)

    def mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup / CutMix of a training batch (soft targets), if configured; the teachers then score the
        mixed images. timm pairs each image with the batch's reverse, so an odd batch (the last one of
        an epoch) stays unmixed."""
        if self.mixup is None or len(x) % 2:
            return x, y
        # timm draws from numpy's global RNG, which Lightning's checkpoints do not keep: seeded per
        # optimizer step instead, a resumed run mixes exactly as an uninterrupted one
        state = np.random.get_state()
        np.random.seed((torch.initial_seed() + self.step_offset + self.global_step) % 2**32)
        try:
            return self.mixup(x.clone(), y)
        finally:
            np.random.set_state(state)

    @property
    def teacher(self) -> PrunableViT | None:
        return self._teacher[0] if self._teacher else None

    def enable_kl(self) -> None:
        self.kl_active = True

    def setup(self, stage: str) -> None:
        from .resume import keep_previous_checkpoints

        if self._trainer is not None:  # every checkpoint file written keeps its previous version
            keep_previous_checkpoints(self._trainer)

    def on_fit_start(self) -> None:
        self.student.train()  # Lightning keeps the modes it finds, and evaluation left it in eval
        for teacher in self._teacher + self._cnn_teacher:
            teacher.to(self.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    # ---- losses --------------------------------------------------------------------------------
    def _label_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 2:  # mixup soft targets
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)

    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logits, logits_dist = self.student.forward_heads(x)
        terms = {}
        if self._cnn_teacher:
            with torch.no_grad():
                hard = self._cnn_teacher[0](x).argmax(-1)
            alpha = self.hparams.cnn_alpha
            terms["ce"] = (1 - alpha) * self._label_loss(logits, y)
            terms["cnn_distill"] = alpha * F.cross_entropy(logits_dist, hard)
            output = (logits + logits_dist) / 2
        else:
            output = logits if logits_dist is None else (logits + logits_dist) / 2
            terms["ce"] = self._label_loss(output, y)
        if self.kl_active and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            terms["kl"] = self.kl_weight * soft_distillation_loss(output, teacher_logits, self.temperature)
        return sum(terms.values()), output, terms

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        hard_labels = y
        x, y = self.mix(x, y)
        loss, output, terms = self.compute_loss(x, y)
        if self._non_finite(loss):
            self._skip_or_stop(terms)
            return None  # Lightning skips backward and the optimizer step
        self.train_top1(output.detach(), hard_labels)
        self.log(f"{self.stage}/train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"{self.stage}/train/{name}", value)
        self.log(f"{self.stage}/train/top1", self.train_top1, on_step=True, on_epoch=False)
        self._log_step(validating=False)
        return loss

    def _log_step(self, validating: bool) -> None:
        # passed in by the hook, not read from `trainer.validating`, which is False during Lightning's
        # sanity check: the key would be logged two ways in validation_step, which Lightning rejects
        self.log("step", float(self.step_offset + self.global_step), on_step=not validating, on_epoch=validating,
                 reduce_fx="max")

    def _non_finite(self, loss: Tensor) -> bool:
        """Whether any rank's loss is non-finite (one flag for all ranks, so all skip or stop together)."""
        bad = (~torch.isfinite(loss.detach())).float()
        return bool(self.trainer.strategy.reduce(bad, reduce_op="max") > 0) if self._trainer else bool(bad)

    def _skip_or_stop(self, terms: dict[str, Tensor]) -> None:
        self.nonfinite_skips += 1
        values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
        if self.nonfinite_skips > self.max_nonfinite_skips:
            raise NonFiniteLossError(
                f"non-finite loss ({values}) at optimizer step {self.global_step}, epoch {self.current_epoch}: "
                f"the learning rate is likely too high (schedule.optimizer.lr / schedule.finetune_optimizer.lr) "
                f"or the data holds broken images; max_nonfinite_skips=N skips up to N such batches")
        log.warning(f"non-finite loss ({values}) at step {self.global_step}: batch skipped "
                    f"({self.nonfinite_skips} of at most {self.max_nonfinite_skips})")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.student(x)
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        self.log(f"{self.stage}/val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{self.stage}/val/top1", self.val_top1, prog_bar=True)
        self.log(f"{self.stage}/val/top5", self.val_top5)
        self._log_step(validating=True)

    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            # timm/DeiT convention: no weight decay on biases, norms and tokens
            (no_decay if p.ndim <= 1 or name.endswith(("_token", "pos_embed")) else decay).append(p)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        # factories take the run's length, e.g. `schedules.warmup_cosine`
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite(self.student, "the checkpoint")
        checkpoint["student_config"] = self.student.config | {"masked": self.student.masked}
        checkpoint["kl_active"] = self.kl_active

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("student_config")
        own = self.student.config | {"masked": self.student.masked}
        if saved is not None and saved != own:
            raise ValueError("checkpoint was written for another architecture/config: "
                             f"{_first_difference(saved, own)}")
        self.kl_active = checkpoint.get("kl_active", self.kl_active)


def _first_difference(saved: dict, own: dict) -> str:
    for key in sorted(set(saved) | set(own)):
        if saved.get(key) != own.get(key):
            return f"{key}: checkpoint {saved.get(key)} vs this run {own.get(key)}"
    return "unknown difference"
