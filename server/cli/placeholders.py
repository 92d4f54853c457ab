"""Help text with real placeholders: ``--server URL``, ``RUN``; never ``<str>`` or ``<bool>``.

Typer shows a parameter's Python type (``<str>``, ``<int>``, ``<bool>``) next to it unless a
metavar is set, and arguments always get their type too. :func:`use_placeholders` walks the
built click command tree once and fixes that: flags (``--json``, ``--help``) show nothing,
arguments show only their name (``RUN``), and an option without a metavar shows its name in
capitals (``--host HOST``). Choices (``<warning|critical>``) and ranges are kept.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

__all__ = ["use_placeholders"]

_TYPE_LABELS = ("<str>", "<int>", "<float>", "<bool>", "<list[str]>")


def use_placeholders(command: Any) -> None:
    """Give every parameter of ``command`` and its subcommands a real placeholder (in place)."""
    context = typer.Context(command)
    help_option = command.get_help_option(context)
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        _fix(param, context)
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            use_placeholders(sub)


def _fix(param: Any, context: typer.Context) -> None:
    if isinstance(param, TyperArgument):
        if param.metavar is None and param.name:
            param.metavar = param.name.upper()
        object.__setattr__(param, "display_type_rich", _no_type)
    elif isinstance(param, TyperOption) and param.metavar is None:
        if param.is_flag or param.count:
            param.metavar = ""
        elif param.display_type(context) in _TYPE_LABELS and param.name:
            param.metavar = param.name.upper()


def _no_type(ctx: object) -> None:
    return None
