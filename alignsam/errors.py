"""The project's own errors: mistakes a user can fix, reported as one line by the command line.

Every error raised for bad input (a config value, a dataset file, a checkpoint, a cache folder)
derives from :class:`UserError`. ``train.py`` and ``evaluate.py`` print such an error as one line,
``error: <message>``, and exit with status 2; the traceback is shown only when the environment
variable ``ALIGNSAM_TRACEBACK=1`` is set. Anything else is a bug and keeps its traceback.

A message names the file or the config key and says what to do.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

TRACEBACK_ENV = "ALIGNSAM_TRACEBACK"


class UserError(Exception):
    """Base of the errors a user can fix (marker class; see the module docstring)."""


class ConfigError(UserError, ValueError):
    """A config value out of its range or of the wrong kind. ``key`` is the dotted config key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


def check_range(key: str, value: float, low: float = None, high: float = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``low <(=) value <(=) high``.

    ``None`` bounds are not checked; ``*_open`` excludes the bound itself.
    """
    if value != value:  # NaN compares false with every bound
        raise ConfigError(key, "is NaN; give a number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(key, f"{value!r} is out of range; it must lie in {interval}")


class CommandLineError(UserError, ValueError):
    """A command line or config file the parser refused (unknown key, wrong type, missing config)."""


def _user_error_in(error: BaseException):
    """The first :class:`UserError` in ``error``'s chain of causes (jsonargparse wraps them), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0", "false", "no")


def exit_on_user_error(run: Callable[[], Any]) -> Any:
    """Call ``run()``; a :class:`UserError` anywhere in a failure's chain becomes one line on
    stderr, ``error: ...``, and exit status 2 (the traceback too with ``ALIGNSAM_TRACEBACK=1``)."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001  re-raised unless it is the user's to fix
        user = _user_error_in(error)
        if user is None or traceback_requested():
            raise
        message = " ".join(str(user).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
