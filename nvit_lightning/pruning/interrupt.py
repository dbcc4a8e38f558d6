"""Stopping a long one-shot loop cleanly on SIGINT / SIGTERM, and the files that let it resume.

    with stop_on_signals():                  # handlers installed; the previous ones come back after
        for i, block in enumerate(blocks):
            ...                              # the block's work: never cut in half
            raise_if_stop_requested(f"block {i + 1} of {len(blocks)}")   # StopRequested (a SystemExit)

A signal only raises a flag; the loop polls it between steps and raises `StopRequested` once the
step it is in is done and saved. A step that cannot poll (a pruner that runs as one step) finishes
first: its caller says so with `stop_after("the search finishes")`, shown when the signal arrives. A second
Ctrl-C aborts at once. Free of Lightning and Hydra: any loop of the pruning core can poll the flag.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("nvit_lightning")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_flag: dict[str, str | None] = {"signal": None, "after": "the current step"}


class StopRequested(SystemExit):
    """A loop stopped on a signal after `where` (its state saved); exit status 128 + the signal."""

    def __init__(self, signal_name: str, where: str) -> None:
        super().__init__(128 + getattr(signal, signal_name))
        self.signal_name, self.where = signal_name, where


def stop_requested() -> str | None:
    """The signal a stop was requested with ("SIGINT" / "SIGTERM"), or None."""
    return _flag["signal"]


def raise_if_stop_requested(where: str) -> None:
    """Call between steps, once the step just done (`where`, for the message) is saved."""
    if _flag["signal"] is not None:
        raise StopRequested(_flag["signal"], where)


def request_stop(signal_name: str = "SIGTERM") -> None:
    """What a signal does (also for tests: stop as if the signal had come now)."""
    _flag["signal"] = signal_name


def stop_after(what: str) -> str:
    """Where a stop requested now takes effect, for the message (e.g. "the search finishes");
    returns the previous text."""
    previous, _flag["after"] = _flag["after"], what
    return previous


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _flag["signal"] is not None:  # a second signal: stop now; what was saved so far stays
        print(f"{name} again: aborting now (the state saved so far is kept)", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    request_stop(name)
    log.warning(f"{name}: stopping after {_flag['after']}, then saving the state (Ctrl-C again to abort now)")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise the stop flag inside the block (main thread only; elsewhere the flag
    is only raised by `request_stop`); the previous handlers and a clear flag afterwards."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS} if main else {}
    _flag.update(signal=None, after="the current step")
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _flag.update(signal=None, after="the current step")


class Checkpoint:
    """One file of a resumable loop's state (tensors and plain values): written atomically (a temporary
    file, then a rename), read with `weights_only=True`. `path=None`: nothing is saved or read."""

    def __init__(self, path: str | Path | None, writable: bool = True) -> None:
        self.path, self.writable = (Path(path) if path is not None else None), writable

    @property
    def active(self) -> bool:
        """Whether `save` writes anything."""
        return self.path is not None and self.writable

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file: one line, and the way on
            raise ValueError(f"{self.path} is not readable ({type(err).__name__}): delete it to redo that step, "
                             f"or start a new run") from None

    def save(self, state: dict[str, Any]) -> None:
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.path)

    def part(self, name: str) -> Checkpoint:
        """Another file beside this one, for a part of the work: `<stem>.<name>.pt`."""
        path = None if self.path is None else self.path.with_name(f"{self.path.stem}.{name}.pt")
        return Checkpoint(path, self.writable)

    def remove(self) -> None:
        if self.active:
            self.path.unlink(missing_ok=True)

    def remove_parts(self) -> None:
        """Remove every `part` beside this file (whatever its step named them), e.g. once the whole
        work is saved here."""
        if self.active:
            for path in self.path.parent.glob(f"{self.path.stem}.*.pt"):
                path.unlink(missing_ok=True)


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s state dict on the CPU, for a checkpoint."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def to_state(value: Any) -> Any:
    """`value` as a checkpoint holds it (`weights_only=True` reads tensors and plain containers only):
    dataclasses become tagged dicts, read back by `from_state`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": type(value).__name__,
                "fields": {f.name: to_state(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {k: to_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_state(v) for v in value)
    return value


def from_state(value: Any, types: Iterable[type]) -> Any:
    """The inverse of `to_state`, for the dataclasses `types`."""
    by_name = {t.__name__: t for t in types}
    if isinstance(value, dict) and set(value) == {"dataclass", "fields"}:
        return by_name[value["dataclass"]](**{k: from_state(v, by_name.values()) for k, v in value["fields"].items()})
    if isinstance(value, dict):
        return {k: from_state(v, by_name.values()) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_state(v, by_name.values()) for v in value)
    return value
