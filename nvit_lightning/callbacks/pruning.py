"""Lightning glue over `nvit_lightning.pruning`: accumulate saliency, prune on schedule, snapshot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..latency.models import LatencyModel
from ..models import KINDS
from ..oneshot import snapshot_path, write_snapshot
from ..pruning import GlobalRanking, event_record
from ..pruning.reconstruct import Reconstruction

log = logging.getLogger(__name__)


class GlobalPruning(L.Callback):
    """Prune the student of an `NViTModule` every `interval` optimizer steps until `target`.

    Saliency is read in `on_before_optimizer_step`: after backward, DDP's gradient all-reduce and
    AMP's unscale, once per optimizer step (also under gradient accumulation), so all ranks hold the
    same scores and make the same decision. Every target in `snapshots` (and `target` itself) that is
    crossed writes a compact `save_pretrained` snapshot to `snapshot_dir/target_<t>`.
    """

    def __init__(self, ranking: GlobalRanking, latency_model: LatencyModel,
                 reconstruction: Reconstruction | None = None, snapshot_dir: str | None = None) -> None:
        super().__init__()
        self.ranking, self.latency_model, self.reconstruction = ranking, latency_model, reconstruction
        self.interval, self.target = ranking.interval, ranking.target
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.history: list[dict[str, Any]] = []
        self.snapshots: dict[float, str] = {}
        self.last_event_step = 0
        self.structure = self.criterion = self.pruner = None
        self._pending_state: dict | None = None

    # ---- set-up -----------------------------------------------------------------------------------
    def build(self, model: torch.nn.Module) -> None:
        """Create structure, criterion and pruner for `model` (a masked PrunableViT)."""
        self.structure, self.criterion, self.pruner = self.ranking.build(model, self.latency_model)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reconstruction is not None and getattr(pl_module, "teacher", None) is None:
            raise ValueError("reconstruction at pruning events needs the dense teacher (distill.kl_weight > 0), "
                             "or set reconstruction=none")
        if stage == "fit" and self.structure is None:
            self.build(pl_module.student)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    @property
    def done(self) -> bool:
        return self.pruner is not None and self.pruner.done

    # ---- the loop ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done:  # resumed from a checkpoint that reached every target: straight on to compaction
            if trainer.is_global_zero:
                log.info("every latency target was already reached in the checkpoint: pruning stage skipped")
            trainer.should_stop = True

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self.done and self.criterion.needs_gradients:
            self.criterion.accumulate()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.history:
            self.structure.zero_pruned()  # AdamW's momentum would otherwise revive pruned weights
        step = trainer.global_step
        if self.done or step == 0 or step % self.interval or step == self.last_event_step:
            return
        self.last_event_step = step
        self.criterion.end_interval()
        event = self.pruner.step(self.criterion.scores())
        pl_module.enable_kl()
        record = event_record(event, pl_module.student, step)
        self.history.append(record)
        pl_module.log_dict({f"prune/{k}": float(v) for k, v in record.items()
                            if isinstance(v, int | float)}, on_step=True, on_epoch=False)
        if trainer.is_global_zero:
            log.info(event.summary())
        if event.targets_reached and self.reconstruction is not None:
            self._reconstruct(trainer, pl_module)
        for target in event.targets_reached:
            self._snapshot(trainer, pl_module, target)
        if self.done:
            trainer.should_stop = True

    def _reconstruct(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refit the student against the frozen dense teacher on the datamodule's calibration batches
        (the same on every rank; rank 0's result is broadcast, because a GPU's attention backward in
        the block distillation is not bit-reproducible and DDP replicas must stay identical)."""
        batches = list(trainer.datamodule.calib_dataloader(self.reconstruction.batches))
        was_training = pl_module.student.training
        results = self.reconstruction(pl_module.student, pl_module.teacher, batches, pl_module.device,
                                      progress=trainer.is_global_zero)
        pl_module.student.train(was_training)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            for tensor in pl_module.student.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        if trainer.is_global_zero and results:
            for what, part in (("layers", [r for r in results if r.layer.count(".") > 1]),
                               ("blocks", [r for r in results if r.layer.count(".") == 1])):
                if part:
                    before = sum(r.error_before for r in part) / len(part)
                    after = sum(r.error_after for r in part) / len(part)
                    log.info(f"reconstruction: mean relative error of {len(part)} {what} {before:.3f} -> {after:.3f}")

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule, target: float) -> None:
        if self.snapshot_dir is None:
            return
        path = snapshot_path(self.snapshot_dir, target)
        if trainer.is_global_zero:
            write_snapshot(pl_module.student.compact(), self.snapshot_dir, target)
            log.info(f"latency target {target} reached: compact snapshot in {path}")
        self.snapshots[target] = str(path)

    # ---- checkpointing ------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        r = self.ranking
        return {"criterion": r.criterion, "eta": r.eta, "targets": r.targets, "interval": r.interval,
                "groups_per_event": r.groups_per_event, "group_sizes": r.group_sizes, "ranking": r.ranking,
                "latency_step": r.latency_step, "kinds": r.kinds}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self._config(), "criterion": self.criterion.state_dict(),
                "pruner": self.pruner.state_dict(), "history": self.history,
                "snapshots": self.snapshots, "last_event_step": self.last_event_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints of older versions lack the newer keys: they ran with these values
        saved = {"ranking": "penalty", "latency_step": None, "kinds": list(KINDS), **state_dict["config"]}
        if saved != self._config():
            diff = {k: (v, self._config().get(k)) for k, v in saved.items() if self._config().get(k) != v}
            raise ValueError(f"resume checkpoint comes from another pruning config (checkpoint vs this "
                             f"run): {diff}")
        if self.structure is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"])
        self.pruner.load_state_dict(state["pruner"])
        self.history = list(state["history"])
        self.snapshots = dict(state["snapshots"])
        self.last_event_step = int(state["last_event_step"])
