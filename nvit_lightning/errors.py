"""What a user sees when a run stops on bad input: one line naming the key or file, exit code 2
(`HYDRA_FULL_ERROR=1` for the traceback); inside a `-m` sweep, the job is recorded as failed and the
sweep goes on (`sweep.py`). Every config value is checked first (`validation.py`), before any model
or data is loaded; Hydra's own errors (an unknown group option or key) exit 2 as well."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from .sweep import in_multirun, record_failed_job
from .validation import check_config, check_run_dir_args

log = logging.getLogger("nvit_lightning")

USER_ERRORS = (FileNotFoundError, ValueError, MissingMandatoryValue)
_task_started = False  # whether Hydra got as far as calling a `cli_errors` task function


def cli_errors(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Check the whole config (`validation.check_config`), then run `main`; bad input (a wrong
    path, a bad config value) becomes a one-line error and exit code 2."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> Any:
        global _task_started
        _task_started = True
        try:
            check_config(cfg)
            return main(cfg)
        except USER_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if in_multirun():
                return record_failed_job(err)
            _exit_with(err)
        except Exception as err:
            if not in_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.exception("this job of the sweep crashed")
            return record_failed_job(err)

    return wrapper


def check_cli_args(argv: list[str]) -> None:
    """Command-line values checked before Hydra starts (and writes into the run dir): a
    `hydra.run.dir` that cannot be a directory is one line, exit 2."""
    if "-m" in argv or "--multirun" in argv:
        return
    try:
        check_run_dir_args(argv)
    except ValueError as err:
        _exit_with(err)


def hydra_exit_codes(hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function so that Hydra's own errors (an unknown config group option such as
    `pruner=hesian`, an unknown key, an unparsable override, a run dir it cannot create) exit 2 like
    the project's, keeping Hydra's message: Hydra reports them with exit code 1 before it calls the
    task function; exit code 1 from inside the task (a crash, a sweep with a failed job) stays 1."""
    global _task_started
    _task_started = False
    try:
        hydra_main()
    except SystemExit as done:
        if done.code == 1 and not _task_started:
            sys.exit(2)
        raise


def _exit_with(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)

