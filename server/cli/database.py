"""One-line errors for the commands that open the database (``server``, ``db``, ``token``).

A database URL that does not parse, names an unknown driver or points at a database that
cannot be opened ends the command with exit 2 and ``gradwatch COMMAND: …`` on stderr, never a
traceback. SQLAlchemy is imported only when such an error is caught.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .exits import CliError, ExitCode

if TYPE_CHECKING:
    from ..store.db import Database

__all__ = ["DatabaseUrlOption", "database_errors", "open_database"]

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        metavar="URL",
        help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or sqlite:///./gradwatch.db.",
    ),
]


@contextmanager
def database_errors(command: str, database_url: str) -> Iterator[None]:
    """Turn failures to open ``database_url`` inside into a one-line error and exit 2."""
    try:
        yield
    except Exception as error:
        message = _describe(error, database_url)
        if message is None:
            raise
        typer.echo(f"gradwatch {command}: {message}", err=True)
        raise typer.Exit(code=int(ExitCode.USAGE)) from None


@contextmanager
def open_database(url: str, command: str, *, must_exist: bool = True) -> Iterator[Database]:
    """Open the database for a CLI command, schema upgraded first.

    With ``must_exist`` (maintenance commands), a SQLite URL naming a file that does not
    exist raises :class:`CliError` (exit 2) rather than creating an empty database; without
    it (``token create`` before the first ``gradwatch server``) the file is created. Open
    failures end the command as :func:`database_errors` does. The engine is disposed of on
    exit. Blocks while migrating.
    """
    from sqlalchemy.engine import make_url

    from ..store.db import Database, create_db_engine, upgrade_database

    with database_errors(command, url):
        parsed = make_url(url)
        path = parsed.database or ""
        if (
            must_exist
            and parsed.get_backend_name() == "sqlite"
            and path not in ("", ":memory:")
            and not path.startswith("file:")
            and not Path(path).is_file()
        ):
            raise CliError(f"no SQLite database at {path} (check --database-url)", ExitCode.USAGE)
        engine = create_db_engine(url)
        try:
            upgrade_database(engine)
        except BaseException:
            engine.dispose()
            raise
    try:
        yield Database(engine)
    finally:
        engine.dispose()


def _describe(error: Exception, database_url: str) -> str | None:
    """The one-line message of a database error, or None when ``error`` is not one."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    shown = _hide_password(database_url)
    if isinstance(error, NoSuchModuleError | ArgumentError):
        return (
            f"bad database URL {shown!r}: {_first_line(error)} "
            "(e.g. sqlite:///./gradwatch.db or postgresql+psycopg://user:pass@host/db)"
        )
    if isinstance(error, DBAPIError):
        return f"cannot open the database {shown!r}: {_first_line(error.orig or error)}"
    if isinstance(error, ModuleNotFoundError) and error.name in ("psycopg", "psycopg2"):
        return f"the database {shown!r} needs {error.name}: pip install 'gradwatch[postgres]'"
    return None


def _hide_password(database_url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return database_url.split("@")[-1] if "@" in database_url else database_url


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
