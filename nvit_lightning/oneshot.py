"""One-shot pruning pieces shared by train.py, prune.py and the benchmarks: any masked-output pruner
followed by the refit and compaction, the snapshots, and a short recovery fine-tune of the compact
model with KL to the dense one."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from .latency.models import LatencyModel
from .models import PrunableViT
from .module import NViTModule
from .oneshot_state import OneShotState, rng_state, set_rng_state
from .pruning import Pruner
from .pruning.interrupt import Checkpoint, StopRequested, cpu_state, raise_if_stop_requested, stop_after
from .pruning.reconstruct import Reconstruction
from .report import target_name


def snapshot_path(directory: str | Path, target: float) -> Path:
    """Where the compact model of a latency target goes: `<directory>/target_<t>`."""
    return Path(directory) / target_name(target)


def write_snapshot(compact: PrunableViT, directory: str | Path, target: float) -> Path:
    """The one writer of snapshots: the compact model of `target` under `directory`."""
    path = snapshot_path(directory, target)
    compact.save_pretrained(path)
    return path


def sparse_path(directory: str | Path, level: float) -> Path:
    """Where the sparse model of a sparsity level goes: `<directory>/sparsity_<s>`."""
    return Path(directory) / f"sparsity_{level:.2f}"


def write_sparse(model: PrunableViT, directory: str | Path, level: float) -> Path:
    """The one writer of sparse models (prune.py's levels, the sweep's): `level`'s under `directory`."""
    path = sparse_path(directory, level)
    model.save_pretrained(path)
    return path


def structured_reconstruction(reconstruction: Any) -> Reconstruction | None:
    """The configured reconstruction, checked before any work to be one a masked model takes
    (`conf/reconstruction/sparse_refit.yaml` repairs sparse models only)."""
    if reconstruction is not None and not isinstance(reconstruction, Reconstruction):
        raise ValueError("reconstruction=sparse_refit | sparse_logits repair sparse models (pruner=ovit | woodfisher | "
                         "global_magnitude); structured pruning: reconstruction=least_squares or block_distill")
    return reconstruction


def prune_and_refit(pruner: Pruner, model: PrunableViT, reference: PrunableViT, latency_model: LatencyModel,
                    batches: Sequence[tuple[Tensor, Tensor]], calib_batches: int,
                    reconstruction: Reconstruction | None = None, device: str | torch.device = "cpu",
                    snapshot_dir: str | Path | None = None, progress: bool = True, state: OneShotState | None = None
                    ) -> tuple[dict[float, PrunableViT], dict[float, str], list[dict]]:
    """Every target of a masked-output `pruner` from the first `calib_batches` calibration batches,
    each refit by `reconstruction` against `reference` (the unpruned model; or the pruner's
    `pruned_from`, where it cut its copies from a model in another basis of the same function, e.g.
    the latency search with `emb`: the refit matches streams channel by channel) and compacted. A model
    that lost something is saved under `snapshot_dir` (when given). Returns the compact models and
    the snapshot paths, by target, and the pruner's history.

    With `state`, SIGINT / SIGTERM stop the pipeline after the current block (of the search when the
    pruner `saves_progress`, else once it returns), its state saved (`oneshot_state.py`); a resumed
    state goes on from there."""
    state = state or OneShotState()  # none: nothing saved, signals left alone
    with state.running():
        pruned, history, pruned_from = prune_step(pruner, model, latency_model, batches[:calib_batches], device,
                                                  progress, state)
        reference = reference if pruned_from is None else pruned_from
        compacts, snapshots = {}, {}
        for target, masked in pruned.items():
            changed = masked.live_dims() != model.live_dims()
            if reconstruction is not None and changed:
                repair_step(f"the refit of target {target}", target, masked, state,
                            lambda checkpoint, masked=masked: reconstruction(masked, reference, batches, device,
                                                                             progress, checkpoint))
            compacts[target] = masked.compact().eval()
            if snapshot_dir is not None and changed:
                snapshots[target] = str(write_snapshot(compacts[target], snapshot_dir, target))
    return compacts, snapshots, history


def prune_step(pruner: Pruner, model: PrunableViT, latency_model: LatencyModel | None,
               batches: Sequence[tuple[Tensor, Tensor]], device: str | torch.device, progress: bool,
               state: OneShotState) -> tuple[dict[float, PrunableViT], list[dict], PrunableViT | None]:
    """The pruner's models by target (masked, or a sparsifier's sparse ones by level), its history
    and its `pruned_from` (None: `model`):
    computed (a stop requested meanwhile takes effect after the pruner's current step when it
    `saves_progress`, else once it returns; its result saved), or as a saved state holds them."""
    checkpoint = state.pruned
    saved = checkpoint.load() if state.resume else None
    if saved is not None:
        set_rng_state(saved["rng"])  # as the pruner left them: later random draws are the same
        pruned_from = saved.get("pruned_from")
        return ({float(t): _with_state(model, s) for t, s in saved["targets"].items()}, saved["history"],
                None if pruned_from is None else _with_state(model, pruned_from))
    progress_file = state.checkpoint("search")  # a pruner that saves_progress: its steps so far
    previous = stop_after(f"the current step of the pruner ({pruner.name})" if pruner.saves_progress else
                          f"the pruner ({pruner.name}) finishes: it runs as one step")
    pruned = pruner(model, latency_model, batches, device, progress, progress_file)
    stop_after(previous)
    history = list(pruner.history)
    pruned_from = pruner.pruned_from
    checkpoint.save({"targets": {str(t): cpu_state(m) for t, m in pruned.items()}, "history": history,
                     "rng": rng_state(), "pruned_from": None if pruned_from is None else cpu_state(pruned_from)})
    progress_file.remove_parts()  # all of it is in pruned.pt now
    progress_file.remove()
    raise_if_stop_requested(f"the pruner ({pruner.name})")
    return pruned, history, pruned_from


def repair_step(what: str, target: float, model: PrunableViT, state: OneShotState,
                repair: Callable[[Checkpoint], Any]) -> Any:
    """`repair(checkpoint)` of one target's model, in place (a refit; a sparse level's reconstruction),
    and what it returns: computed block by block (a stop takes effect after the current block, saved),
    resumed, or loaded once finished. `what` names it in the stop messages."""
    checkpoint = state.refit(target)
    saved = checkpoint.load() if state.resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        return saved.get("result")
    previous = stop_after(f"the current block of {what}")
    try:
        result = repair(checkpoint)
    except StopRequested as stop:
        stop.where += f" (target {target})"
        raise
    stop_after(previous)
    kept = result if isinstance(result, dict) else None  # a report entry; a refit's fit results are not kept
    checkpoint.save({"model": cpu_state(model), "result": kept})
    checkpoint.remove_parts()  # its progress: no longer needed
    raise_if_stop_requested(f"{what} (target {target})")  # a step that does not poll, e.g. the logit step
    return kept


def _with_state(model: PrunableViT, state: dict[str, Tensor]) -> PrunableViT:
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(state)
    return copy_


def recover(student: PrunableViT, teacher: PrunableViT, datamodule: L.LightningDataModule,
            trainer: L.Trainer, optimizer: Callable[..., torch.optim.Optimizer], kl_weight: float,
            temperature: float, label_smoothing: float = 0.0, max_nonfinite_skips: int = 0) -> PrunableViT:
    """Fine-tune `student` for the trainer's `max_steps` with KL to the frozen `teacher` (a fresh
    optimizer); returns the student, left in eval mode."""
    module = NViTModule(student, optimizer=optimizer, kl_weight=kl_weight, temperature=temperature,
                        kl_from_start=True, teacher=teacher, label_smoothing=label_smoothing, stage="recover")
    trainer.fit(module, datamodule=datamodule)
    return module.student.eval()
