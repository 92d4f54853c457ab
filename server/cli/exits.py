"""Exit codes of every ``gradwatch`` command (DESIGN §10) and the one-line error they print."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

import typer

__all__ = ["CliError", "ExitCode", "report_errors"]


class ExitCode(IntEnum):
    """0 ok, 1 check failed, 2 usage or configuration error, 3 server unreachable."""

    OK = 0
    CHECK_FAILED = 1
    USAGE = 2
    UNREACHABLE = 3


class CliError(Exception):
    """An expected failure: a one-line ``message`` and the process's ``exit_code``."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@contextmanager
def report_errors(command: str) -> Iterator[None]:
    """Turn a :class:`CliError` raised inside into ``gradwatch COMMAND: message`` and its exit."""
    try:
        yield
    except CliError as error:
        typer.echo(f"gradwatch {command}: {error.message}", err=True)
        raise typer.Exit(code=int(error.exit_code)) from None
