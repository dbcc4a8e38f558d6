"""What a user sees when a run stops on bad input: one line naming the key or file, exit code 2
(`HYDRA_FULL_ERROR=1` for the traceback); inside a `-m` sweep, the job is recorded as failed and the
sweep goes on (`sweep.py`)."""

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

log = logging.getLogger("nvit_lightning")

USER_ERRORS = (FileNotFoundError, ValueError, MissingMandatoryValue)


def cli_errors(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn bad input (a wrong path, a bad config value) into a one-line error and exit code 2."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> Any:
        try:
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


def _exit_with(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)

