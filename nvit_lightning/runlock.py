"""One run per run directory: a lock file naming the process that writes there, so a second run
into the same `hydra.run.dir` stops at once instead of mixing its model, report and checkpoints with
the first one's. A lock left by a process that no longer runs (killed, machine restarted) is taken
over with a warning."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("nvit_lightning")

LOCK_FILE = ".run.lock"
_held: set[Path] = set()


class RunDirLockedError(ValueError):
    """Another live process holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def acquire(run_dir: str | Path) -> None:
    """Hold `run_dir` for this process until it exits (idempotent within the process)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _check_holder(path, run_dir)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.add(run_dir)
        atexit.register(release, run_dir)
        return
    raise RunDirLockedError(f"could not lock {run_dir}: another run took it first (choose another hydra.run.dir)")


def _check_holder(path: Path, run_dir: Path) -> None:
    """Refuse a live holder; remove the lock of a dead one (or an unreadable lock) with a warning."""
    try:
        holder = json.loads(path.read_text())
        pid, host, started = int(holder["pid"]), holder.get("host"), holder.get("started", "?")
    except (OSError, ValueError, KeyError, TypeError):
        log.warning(f"{path} is unreadable: taking the run directory over")
        path.unlink(missing_ok=True)
        return
    if host == socket.gethostname() and not _alive(pid):
        log.warning(f"{run_dir} was locked by PID {pid} (started {started}), which no longer runs: taking it over")
        path.unlink(missing_ok=True)
        return
    where = "" if host == socket.gethostname() else f" on {host}"
    raise RunDirLockedError(f"{run_dir} is in use by another run (PID {pid}{where}, started {started}): wait for it "
                       f"to finish, or choose another hydra.run.dir")


def release(run_dir: str | Path) -> None:
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        _held.discard(run_dir)
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
