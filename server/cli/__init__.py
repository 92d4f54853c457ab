"""The ``gradwatch`` command: ``server``, ``demo``, ``db upgrade``, ``token`` and ``upload``.

One module per command group; this one assembles them. Commands import their heavy dependencies
(uvicorn, TensorFlow, the agent) lazily, so ``gradwatch --help`` stays fast.
"""

from __future__ import annotations

import typer

from .demo import demo
from .server import db_app, server
from .token import token_app
from .upload import upload

__all__ = ["app", "main"]

app = typer.Typer(
    help="gradwatch: gradient-health monitoring for TensorFlow/Keras training.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(server)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.command()(demo)
app.command()(upload)


def main() -> None:
    """Console-script entry point."""
    app()
