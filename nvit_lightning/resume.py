"""Resuming a train.py run: which checkpoint, checked before any work, and checkpoints that survive.

- Every checkpoint file keeps its predecessor: writing `last.ckpt` first moves the one there (a
  readable checkpoint of another step) to `last.previous.ckpt` (`KeepPreviousCheckpointIO`).
- A checkpoint is read with `torch.load(weights_only=True)` (tensors and plain values only: a
  checkpoint is never code to run) and verified before any evaluation: readable, all tensors finite.
- `ckpt_path=last` takes the newest readable checkpoint of the run: a truncated or corrupt `last.ckpt`
  falls back to the previous one with a warning naming both; `ckpt_path=<file>` is that file, and a
  bad one is one line naming it.
- A resume is refused (one line) for a changed pruning config (`pruner.interval`, ...) or changed
  training data (`data.train.num_samples`, the data root or kind, `data.batch_size`, ...): it could not
  go on as the interrupted run would have.
- `python train.py ... ckpt_path=...` runs these checks before Hydra starts (`check_before_hydra`):
  a refused resume changes no file of the run (Hydra would first rewrite its `.hydra/` and log).
"""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("nvit_lightning")

PREVIOUS_SUFFIX = ".previous"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, non-finite, or for another run."""


def previous_path(path: str | Path) -> Path:
    """Where `path`'s predecessor is kept: `last.ckpt` -> `last.previous.ckpt`."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_SUFFIX}{path.suffix}")


# ---- reading and verifying ------------------------------------------------------------------------
def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, loaded with `weights_only=True`; one line naming the file if
    it is missing, truncated or not a checkpoint (never torch's advice to load it with
    `weights_only=False`, which would run whatever code a foreign file holds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # unpickling raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable Lightning checkpoint ({_why_unreadable(path, err)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint of train.py (no state_dict)")
    return ckpt


def _why_unreadable(path: Path, err: BaseException) -> str:
    if path.stat().st_size == 0:
        return "an empty file"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        return "truncated, or not a checkpoint file"
    if "Weights only load failed" in str(err):
        return ("it holds Python objects besides tensors and plain values, and unpickling those could run "
                "code: train.py's checkpoints hold none")
    return f"corrupt: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.split(". ")[0][:200] or type(err).__name__


def _tensors(value: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{key}.{i}")


def verify_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint with a NaN / inf in its weights or optimizer state."""
    for part in ("state_dict", "optimizer_states"):
        for key, tensor in _tensors(ckpt.get(part, {}), part):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"checkpoint {path} holds NaN/inf values ({key}): resume from an earlier "
                                      f"checkpoint (ckpt_path=<file>) or start a new run")


_summaries: dict[tuple[str, int, int], dict[str, Any]] = {}  # (path, mtime, size) -> checkpoint_summary


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint (`read_checkpoint`, `verify_checkpoint`), and return what a resume
    checks: its step, stage, training data and pruning config. Remembered per file version, so the
    pre-Hydra check and the run itself read each checkpoint once (Lightning then loads it to resume)."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size) if stat else None
    if key in _summaries:
        return _summaries[key]
    ckpt = read_checkpoint(path)
    verify_checkpoint(ckpt, path)
    from .callbacks import GlobalPruning
    from .data import ViTDataModule

    pruning = (ckpt.get("callbacks") or {}).get(GlobalPruning.__qualname__)
    summary = {"global_step": ckpt.get("global_step"), "stage": (ckpt.get("hyper_parameters") or {}).get("stage"),
               "training_data": (ckpt.get(ViTDataModule.__qualname__) or {}).get("training_data"),
               "pruning": {"config": pruning["config"]} if pruning and "config" in pruning else None,
               "student_config": ckpt.get("student_config")}
    if key is not None:
        _summaries[key] = summary
    return summary


def _step(summary: dict[str, Any]) -> str:
    return f"step {summary.get('global_step', '?')}"


# ---- which checkpoint ---------------------------------------------------------------------------------
def _newest_first(checkpoint_dir: Path) -> list[Path]:
    return sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)


def _first_readable(candidates: list[Path], quiet: bool) -> Path:
    """The newest candidate that loads and is finite; a warning naming the files passed over."""
    failures = []
    for path in candidates:
        try:
            summary = checkpoint_summary(path)
        except (CheckpointError, FileNotFoundError) as err:
            failures.append((path, err))
            continue
        if failures and not quiet:
            skipped = "; ".join(str(err) for _, err in failures)
            log.warning(f"{skipped}: resuming from the previous checkpoint {path} ({_step(summary)})")
        return path
    path, err = failures[0]
    if len(failures) == 1:
        raise err
    raise CheckpointError(f"{err}; and no earlier checkpoint of {path.parent} is readable either "
                          f"({', '.join(p.name for p, _ in failures[1:])}): start a new run")


def resume_path(ckpt_path: str | None, checkpoint_dir: Path, quiet: bool = False) -> str | None:
    """`ckpt_path=last`: the newest readable stage-1 checkpoint of this run dir (a corrupt `last.ckpt`
    falls back to `last.previous.ckpt`, with a warning); a path: that file, verified. A fresh run into
    a dir that already holds checkpoints overwrites them, with a warning."""
    checkpoint_dir = Path(checkpoint_dir)
    existing = _newest_first(checkpoint_dir) if checkpoint_dir.is_dir() else []
    if ckpt_path == "last":
        if not existing:
            raise FileNotFoundError(f"ckpt_path=last: no checkpoint in {checkpoint_dir} (set hydra.run.dir to the "
                                    f"run to resume, or ckpt_path=<file>)")
        return str(_first_readable(existing, quiet))
    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path {ckpt_path} not found (ckpt_path=last resumes the newest checkpoint "
                                    f"of hydra.run.dir)")
        checkpoint_summary(ckpt_path)
        return str(ckpt_path)
    if existing and not quiet and _is_rank_zero():
        log.warning(f"{checkpoint_dir} already holds checkpoints of an earlier run: this fresh run overwrites "
                    f"them (resume with ckpt_path=last instead)")
    return None


def finetune_resume_path(ckpt_path: str | None, finetune_dir: Path, quiet: bool = False) -> str | None:
    """`ckpt_path=last` goes on with stage 2 where it stopped (its newest readable checkpoint), once
    stage 1 (resumed past its targets) has compacted the same model again; otherwise stage 2 starts
    afresh."""
    finetune_dir = Path(finetune_dir)
    existing = _newest_first(finetune_dir) if finetune_dir.is_dir() else []
    if ckpt_path != "last" or not existing:
        return None
    path = str(_first_readable(existing, quiet))
    if not quiet:
        log.info(f"resuming the fine-tuning stage from {path}")
    return path


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


# ---- the run's settings against the checkpoint's ------------------------------------------------------
def check_resume(cfg: DictConfig, pruner: Any = None, quiet: bool = False) -> None:
    """Everything a resume (`ckpt_path`) needs, checked before any work or any file written: the
    checkpoints of both stages resolved and verified, and the checkpoint's pruning config and training
    data equal to this run's. `pruner`: the run's built `cfg.pruner` (built here if not given)."""
    if cfg.get("ckpt_path") is None:
        return
    if pruner is None:
        from .app import build

        pruner = build(cfg.pruner)
    sparse, gradual = getattr(pruner, "output", "masked") == "sparse", getattr(pruner, "gradual", False)
    if not sparse and not gradual:
        raise ValueError(f"ckpt_path resumes the pruning-while-training stage; pruner="
                         f"{getattr(pruner, 'name', type(pruner).__name__)} prunes in one shot and has no stage-1 "
                         f"checkpoint: run again without ckpt_path")
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    stages = [("prune", resume_path(cfg.ckpt_path, checkpoints, quiet=True))]
    if not sparse:
        stages.append(("finetune", finetune_resume_path(cfg.ckpt_path, checkpoints / "finetune", quiet=True)))
    for stage, path in stages:
        if path is None:
            continue
        summary = checkpoint_summary(path)
        if stage == "prune" and summary["stage"] == "finetune":
            raise CheckpointError(f"{path} is a stage-2 (fine-tuning) checkpoint: ckpt_path=<file> resumes "
                                  f"stage 1; resume the whole run with hydra.run.dir=<run> ckpt_path=last")
        _check_training_data(summary["training_data"], cfg, path)
        if stage == "prune" and gradual and summary["pruning"] is not None:
            _check_pruning_config(summary["pruning"], pruner, path)


def _check_training_data(saved: dict[str, Any] | None, cfg: DictConfig, path: str) -> None:
    from .data.datamodule import ViTDataModule, training_data, training_data_difference

    if saved is None or not str(cfg.data.get("_target_", "")).endswith(ViTDataModule.__name__):
        return
    difference = training_data_difference(saved, training_data(OmegaConf.to_container(cfg.data, resolve=True)))
    if difference:
        raise CheckpointError(f"cannot resume from {path}: it was written for other training data "
                              f"({difference}); resume with the run's own data settings, or start a new run")


def _check_pruning_config(state: dict[str, Any], pruner: Any, path: str) -> None:
    """The check `GlobalPruning.load_state_dict` makes when Lightning restores it, made up front."""
    from .callbacks import GlobalPruning

    try:
        GlobalPruning(pruner, None).load_state_dict(state)
    except ValueError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None


def _check_model(cfg: DictConfig, pruner: Any) -> None:
    """The check `NViTModule.on_load_checkpoint` makes when Lightning restores stage 1 (the model's
    architecture), made up front: the model is built (its weights read) to know its config."""
    if not getattr(pruner, "gradual", False):
        return
    path = resume_path(cfg.ckpt_path, Path(cfg.paths.output_dir) / "checkpoints", quiet=True)
    saved = checkpoint_summary(path).get("student_config") if path else None
    if saved is None:
        return
    from .app import build
    from .module import _first_difference

    try:
        model = build(cfg.model)
    except Exception:  # a missing or corrupt model file: the run reports it in its own words
        return
    own = model.config | {"masked": model.masked}
    if saved != own:
        raise CheckpointError(f"cannot resume from {path}: it was written for another model "
                              f"({_first_difference(saved, own)})")


# ---- before Hydra starts ------------------------------------------------------------------------------
def check_before_hydra(config_name: str, argv: list[str]) -> None:
    """`python train.py ... ckpt_path=<...>`: compose the run's config as Hydra will and run
    `check_resume` on it, before Hydra writes anything into the run dir; a refused resume is one line
    and exit 2, and every file of the run stays as it was. Anything else is left to Hydra and the run."""
    from .app import compose_before_hydra

    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in ("ckpt_path", "+ckpt_path")]
    if not values or values[-1] in ("null", "None", ""):
        return
    cfg = compose_before_hydra(config_name, argv)
    if cfg is None:  # -m, --help, --cfg, a bad override: Hydra's business
        return
    from .app import build
    from .errors import USER_ERRORS

    try:
        pruner = build(cfg.pruner)
    except Exception:  # bad pruner options: the run reports them
        return
    try:
        check_resume(cfg, pruner, quiet=True)
        _check_model(cfg, pruner)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---- writing: keep the previous checkpoint -------------------------------------------------------------
class KeepPreviousCheckpointIO(CheckpointIO):
    """Lightning's checkpoint writer, keeping each file's predecessor: before `last.ckpt` is written,
    the readable checkpoint there (of another step) moves to `last.previous.ckpt`. A file that does not
    load (truncated) is overwritten, never kept in place of a good previous one."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner
        self._steps: dict[str, int | None] = {}  # path -> step of the checkpoint this process wrote there

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        step = checkpoint.get("global_step")
        if target.is_file() and self._step_on_disk(target) not in (None, step):
            os.replace(target, previous_path(target))
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self._steps[str(target)] = step

    def _step_on_disk(self, path: Path) -> int | None:
        if str(path) in self._steps:
            return self._steps[str(path)]
        try:  # memory-mapped: the step, without reading the weights
            return read_checkpoint(path, mmap=True).get("global_step")
        except (CheckpointError, FileNotFoundError, RuntimeError):
            return None

    def load_checkpoint(self, path: Any, map_location: Any | None = None, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def keep_previous_checkpoints(trainer: Any) -> None:
    """Make `trainer` keep the previous version of every checkpoint file it writes (idempotent)."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, KeepPreviousCheckpointIO):
        strategy.checkpoint_io = KeepPreviousCheckpointIO(strategy.checkpoint_io)


# ---- prune.py mode=export --------------------------------------------------------------------------------
def load_train_checkpoint(path: str):
    """The student of a train.py Lightning checkpoint: the masked model of stage 1, or the compact one
    of stage 2 (fine-tuning)."""
    from .models import PrunableViT

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set checkpoint=<run>/checkpoints/last.ckpt)")
    ckpt = read_checkpoint(path)
    verify_checkpoint(ckpt, path)
    if "student_config" not in ckpt:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no student_config)")
    model = PrunableViT(**ckpt["student_config"])
    state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit its student_config ({_first_line(err)})") from None
    return model
