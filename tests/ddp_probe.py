"""A callback the DDP test adds from the command line: each rank dumps what it ended with."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class DumpPerRank(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = pl_module.student
        compact = student.compact() if student.masked else student
        state = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                 "masks": {k: v.cpu() for k, v in student.masks().items()},
                 "compact": {k: v.cpu() for k, v in compact.state_dict().items()}}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stage = "prune" if student.masked else "finetune"
        torch.save(state, self.out_dir / f"{stage}_rank{trainer.global_rank}.pt")
