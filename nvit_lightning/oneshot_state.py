"""The one-shot pipeline's state (`prune.py`, and `train.py`'s one-shot stage 1), for resuming it.

Under `<run>/checkpoints/oneshot/`, every file written atomically (`pruning.interrupt.Checkpoint`):

    fingerprint.json            the config sections the state depends on (a resume must match them)
    search.pt / search.statistics.pt   the latency search so far: the blocks traced, the layer statistics
    pruned.pt                   the pruner's models by target (masked; a sparsifier's: sparse, by level), its
                                history, the RNG states after it (once it is written, the search's files go)
    target_<t>.pt               a target's (level's) finished refit: the model, the reconstruction's report
    target_<t>.least_squares.pt / target_<t>.distillation.pt     a refit stopped after some block

On SIGINT / SIGTERM the pipeline stops after the current block (of the latency search, the refit or
the distillation; a pruner that does not save its progress: once it returns), saves, and prints the
command that resumes it: the run's own overrides plus `ckpt_path=last`. Once the run has written its
report the state is removed (`OneShotState.finish`): for DeiT-Base it is several hundred MB of masked
models, and a finished run has nothing to resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .pruning.interrupt import Checkpoint, StopRequested, stop_on_signals
from .report import REPORT_FILE, target_name

log = logging.getLogger("nvit_lightning")

# the config the one-shot result depends on: a resume with any of it changed is refused
FINGERPRINT_KEYS = ("model", "data", "latency", "pruner", "reconstruction", "calib_batches", "seed", "rescore",
                    "rescore_batches")
IGNORED = ("data.num_workers", "data.val")  # speed, and the evaluation only: not the one-shot result
FINGERPRINT_FILE = "fingerprint.json"


class OneShotState:
    """The state files of one run's one-shot pipeline. `resume`: go on from what is saved (checked
    against this run's config by `check`); else a fresh run that replaces any earlier state.
    `writable=False`: read, never written. No `directory`: nothing saved or read."""

    def __init__(self, directory: str | Path | None = None, fingerprint: dict[str, Any] | None = None,
                 command: str = "", resume: bool = False, writable: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint, self.command, self.resume, self.writable = fingerprint or {}, command, resume, writable

    @property
    def active(self) -> bool:
        return self.directory is not None

    def checkpoint(self, name: str) -> Checkpoint:
        return Checkpoint(self.directory / f"{name}.pt" if self.active else None, self.writable)

    @property
    def pruned(self) -> Checkpoint:
        return self.checkpoint("pruned")

    def refit(self, target: float) -> Checkpoint:
        return self.checkpoint(target_name(target))

    def exists(self) -> bool:
        return self.active and (self.directory / FINGERPRINT_FILE).is_file()

    def check(self, ckpt_path: str) -> None:
        """Refuse (one line) a resume that could not end as the interrupted run would have."""
        if ckpt_path != "last":
            raise ValueError(f"ckpt_path={ckpt_path}: the one-shot pipeline resumes from its state in the run dir: "
                             f"use hydra.run.dir=<run> ckpt_path=last")
        if not self.exists() and (self.directory.parent.parent / REPORT_FILE).is_file():
            raise ValueError(f"ckpt_path=last: the run in {self.directory.parent.parent} finished ({REPORT_FILE}); "
                             f"there is nothing to resume: run again without ckpt_path")
        if not self.exists():
            raise FileNotFoundError(f"ckpt_path=last: no one-shot state in {self.directory} (set hydra.run.dir to "
                                    f"the interrupted run, or run without ckpt_path)")
        try:
            saved = json.loads((self.directory / FINGERPRINT_FILE).read_text())
        except (OSError, ValueError):
            raise ValueError(f"{self.directory / FINGERPRINT_FILE} is not readable: start a new run") from None
        own = _plain(self.fingerprint)
        if saved != own:
            raise ValueError(f"cannot resume the one-shot state in {self.directory}: {_first_difference(saved, own)}; "
                             f"resume with the run's own settings, or start a new run without ckpt_path")

    @contextmanager
    def running(self) -> Iterator[None]:
        """The pipeline's work: a fresh run's state begun; SIGINT / SIGTERM stop it between steps (with
        a state to save them in), the stop reported with the command that resumes."""
        with stop_on_signals() if self.active else nullcontext():
            try:
                self.begin()
                yield
            except StopRequested as stop:
                self.stopped(stop)
                raise

    def begin(self) -> None:
        """A fresh run: replace any earlier state of the run dir, record this run's fingerprint."""
        if self.resume or not self.writable or not self.active:
            return
        if self.directory.is_dir():
            log.warning(f"{self.directory} holds the one-shot state of an earlier run: this fresh run replaces it "
                        f"(resume with ckpt_path=last instead)")
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        temporary = self.directory / f".{FINGERPRINT_FILE}.tmp"
        temporary.write_text(json.dumps(_plain(self.fingerprint), indent=1))
        os.replace(temporary, self.directory / FINGERPRINT_FILE)

    def finish(self) -> None:
        """The run wrote its report: its state is no longer needed."""
        if self.active and self.writable and self.directory.is_dir():
            shutil.rmtree(self.directory)
            if not any(self.directory.parent.iterdir()):  # checkpoints/ held nothing else
                self.directory.parent.rmdir()
            log.info(f"the run is finished: removed its one-shot state ({self.directory})")

    def stopped(self, stop: StopRequested) -> None:
        """The line a user sees when the pipeline stopped on a signal."""
        log.warning(f"{stop.signal_name}: stopped after {stop.where}; state saved in {self.directory}; "
                    f"resume with: {self.command}")


def oneshot_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints" / "oneshot"


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The config sections the one-shot result depends on, resolved."""
    plain = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
             for k, v in ((k, cfg.get(k)) for k in FINGERPRINT_KEYS)}
    for key in IGNORED:
        section, name = key.split(".")
        if isinstance(plain.get(section), dict):
            plain[section].pop(name, None)
    return plain


def resume_command(script: str, run_dir: str | Path, argv: list[str] | None = None) -> str:
    """`python <script> <this run's overrides> hydra.run.dir=<run> ckpt_path=last`."""
    argv = sys.argv[1:] if argv is None else argv
    kept = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in ("hydra.run.dir", "ckpt_path")]
    return " ".join(["python", script, *map(shlex.quote, kept), f"hydra.run.dir={shlex.quote(str(run_dir))}",
                     "ckpt_path=last"])


def open_state(cfg: DictConfig, script: str, writable: bool = True) -> OneShotState:
    """The run's one-shot state: a fresh one, or with `ckpt_path` the saved one, checked against the
    config (before any work)."""
    ckpt_path = cfg.get("ckpt_path")
    state = OneShotState(oneshot_dir(cfg), fingerprint(cfg), resume_command(script, cfg.paths.output_dir),
                         resume=ckpt_path is not None, writable=writable)
    if ckpt_path is not None:
        state.check(str(ckpt_path))
    return state


def has_state(cfg: DictConfig) -> bool:
    return (oneshot_dir(cfg) / FINGERPRINT_FILE).is_file()


def check_before_hydra(config_name: str, script: str, argv: list[str]) -> bool:
    """`python <script> ... ckpt_path=last` with a one-shot pruner: the saved state checked against the
    run's config before Hydra writes into the run dir (a refused resume: one line, exit 2, no file of the
    run changed). True when this was such a resume; False when it is none of ours (train.py then runs its
    own checks: a gradual pruner's checkpoints, or its refusal of ckpt_path for a one-shot pruner)."""
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in ("ckpt_path", "+ckpt_path")]
    if not values or values[-1] in ("null", "None", ""):
        return False
    from .app import build, compose_before_hydra

    cfg = compose_before_hydra(config_name, argv)
    if cfg is None or cfg.get("ckpt_path") is None or cfg.get("mode", "prune") != "prune":
        return False
    from .errors import USER_ERRORS

    try:
        pruner = build(cfg.pruner)
    except Exception:  # bad pruner options: the run reports them
        return False
    try:
        # prune.py runs every pruner in one shot; train.py trains a gradual one and sweeps a sparsifier's
        # levels (their own checkpoints)
        if config_name == "train" and (pruner.output != "masked" or pruner.gradual or not has_state(cfg)):
            return False
        open_state(cfg, script, writable=False)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return True


# ---- the RNG states after the pruner: a resumed run's later random draws are the uninterrupted run's ----
def rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, key, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists: compared as they are read back


def _first_difference(saved: Any, own: Any, key: str = "") -> str:
    if isinstance(saved, dict) and isinstance(own, dict):
        for k in sorted(set(saved) | set(own), key=str):
            if saved.get(k) != own.get(k):
                return _first_difference(saved.get(k), own.get(k), f"{key}.{k}" if key else str(k))
    return f"it was saved with {key}={json.dumps(saved)}, this run has {key}={json.dumps(own)}"
