"""What the commands that train (``demo``, ``study``) share: their server options and the
embedded server they start when no ``--server`` is given.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console

__all__ = [
    "EmbeddedDatabaseOption",
    "TrainingServer",
    "TrainingServerOption",
    "TrainingTokenOption",
    "serve_until_interrupted",
    "training_server",
]

TrainingServerOption = Annotated[
    str | None,
    typer.Option(metavar="URL", help="Stream to this server instead of an embedded one."),
]
TrainingTokenOption = Annotated[
    str | None,
    typer.Option(
        envvar="GRADWATCH_TOKEN",
        metavar="TOKEN",
        help="API token with the ingest and read scopes, for a --server that has tokens.",
    ),
]
EmbeddedDatabaseOption = Annotated[
    str | None,
    typer.Option(
        metavar="URL",
        help="SQLAlchemy URL of the embedded server's database (default: a temp file).",
    ),
]


@dataclass(frozen=True, slots=True)
class TrainingServer:
    """The server a command streams to."""

    url: str
    embedded: bool
    """True when the command started it (and stops it on return)."""


@contextmanager
def training_server(
    server: str | None, database_url: str | None, name: str, console: Console
) -> Iterator[TrainingServer]:
    """Yield ``server``, or start an embedded one (on ``database_url``, default a temp SQLite
    file named after ``name``) and stop it on exit. Blocks while it starts and stops."""
    if server is not None:
        yield TrainingServer(server, embedded=False)
        return
    from ..config import Settings
    from ..embedded import EmbeddedServer

    if database_url is None:
        database_url = f"sqlite:///{tempfile.mkdtemp(prefix=f'gradwatch-{name}-')}/{name}.db"
    embedded = EmbeddedServer(Settings(database_url=database_url)).start()
    console.print(f"Embedded gradwatch server at {embedded.url} (database {database_url})")
    try:
        yield TrainingServer(embedded.url, embedded=True)
    finally:
        embedded.stop()


def serve_until_interrupted(console: Console) -> None:
    """Block until Ctrl-C (``KeyboardInterrupt`` propagates), keeping printed URLs alive."""
    console.print("[bold]Serving these URLs until Ctrl-C.[/bold]", highlight=False)
    threading.Event().wait()
