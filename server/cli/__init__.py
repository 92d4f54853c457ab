"""The ``gradwatch`` command.

Server side: ``server``, ``db upgrade``, ``token`` (open the database). Client side, over the
REST API only: ``runs``, ``show``, ``check``, ``open``. Agent side: ``demo``, ``upload``. One
module per command group; this one assembles them. Commands import their heavy dependencies
(uvicorn, SQLAlchemy, TensorFlow, the agent) lazily, so ``gradwatch --help`` stays fast.
Exit codes (DESIGN §10): 0 ok, 1 check failed, 2 usage or configuration error, 3 server
unreachable.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

import typer

from .check import check
from .demo import demo
from .open import open_run
from .placeholders import use_placeholders
from .replay import replay
from .runs import runs
from .server import db_app, server
from .show import show
from .study import study
from .token import token_app
from .upload import upload

__all__ = ["app", "build_command", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
)


def _version() -> str:
    try:
        return package_version("gradwatch")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gradwatch {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """gradwatch: gradient-health monitoring for TensorFlow/Keras training.

    Exit codes: 0 ok, 1 check failed, 2 usage or configuration error, 3 server unreachable.
    """


app.command(rich_help_panel="Runs")(runs)
app.command(rich_help_panel="Runs")(show)
app.command(rich_help_panel="Runs")(check)
app.command("open", rich_help_panel="Runs")(open_run)
app.command(rich_help_panel="Server")(server)
app.add_typer(db_app, name="db", rich_help_panel="Server")
app.add_typer(token_app, name="token", rich_help_panel="Server")
app.command(rich_help_panel="Agent")(demo)
app.command(rich_help_panel="Agent")(upload)
app.command(rich_help_panel="Agent")(study)
app.command(rich_help_panel="Agent")(replay)


def build_command() -> Any:
    """The click command of ``gradwatch``, with real placeholders in its help."""
    command = typer.main.get_command(app)
    use_placeholders(command)
    return command


def main() -> None:
    """Console-script entry point."""
    build_command()(prog_name="gradwatch")
