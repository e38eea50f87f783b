"""The error a user can cause, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (config, paths, data, checkpoints).

    The message names the thing at fault and the fix. The command-line entry points print it
    on one line, without a traceback, and exit with code 2.
    """


class Diverged(UserError):
    """Training met a loss or gradient that is not finite (`train.on_nonfinite`); the last good
    state is saved. Exit code 3."""

    exit_code = 3


def _line(text: str) -> None:
    """One line on stderr in one write: processes sharing a log (several on one host) cannot
    split it, even with unbuffered output (PYTHONUNBUFFERED), where `print` writes the newline
    apart."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def cli(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps a command's `main` so a `UserError` exits 2 (a `Diverged` run 3) with one line on
    stderr."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _line(f"error: {e}")
            sys.exit(getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            _line("interrupted")
            sys.exit(130)

    return wrapper
