"""``gradwatch server`` and the ``gradwatch db`` group: serve the API, migrate the schema
(``db prune`` and ``db backup`` live in ``maintenance.py``)."""

from __future__ import annotations

from typing import Annotated

import typer

from .database import DatabaseUrlOption, database_errors
from .maintenance import db_backup, db_prune

__all__ = ["db_app", "server"]


def server(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="PORT", help="TCP port.")] = 8000,
    database_url: DatabaseUrlOption = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Serve without tokens on a non-loopback address (open to anyone)."
        ),
    ] = False,
    rate_limit: Annotated[
        float | None,
        typer.Option(
            min=0,
            metavar="N",
            help="Requests per second per token (0: off); default $GRADWATCH_RATE_LIMIT_PER_SECOND"
            " or 20.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Worker processes (uvicorn workers); the rate limits and /metrics hold for "
            "the server as a whole.",
        ),
    ] = 1,
) -> None:
    """Run the gradwatch server (upgrades the database schema on start).

    Without API tokens the server is open, which it allows only on a loopback address unless
    --insecure is given; with tokens every API request needs one (Authorization: Bearer).
    With --workers N, N processes serve the same port; they share the rate-limit buckets and
    the self-metrics, so every limit and counter is the server's, not one worker's.
    """
    import uvicorn

    from ..app import create_app
    from ..auth import InsecureBindError, has_active_tokens, require_auth_for_bind
    from ..config import Settings
    from ..store.db import Database, create_db_engine, upgrade_database

    overrides: dict[str, object] = {}
    if database_url is not None:
        overrides["database_url"] = database_url
    if rate_limit is not None:
        overrides["rate_limit_per_second"] = rate_limit
    settings = Settings(**overrides)  # type: ignore[arg-type]
    with database_errors("server", settings.database_url):
        engine = create_db_engine(settings.database_url)
        try:
            upgrade_database(engine)
            with Database(engine).read_session() as session:
                has_tokens = has_active_tokens(session)
        finally:
            engine.dispose()
    try:
        require_auth = require_auth_for_bind(host, has_tokens=has_tokens, insecure=insecure)
    except InsecureBindError as error:
        typer.echo(f"gradwatch server: {error}", err=True)
        raise typer.Exit(code=2) from None
    settings = settings.model_copy(update={"require_auth": require_auth or settings.require_auth})
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port)
    else:
        from .workers import serve_workers

        serve_workers(settings, host=host, port=port, workers=workers)


db_app = typer.Typer(help="Database schema, retention and backups.", no_args_is_help=True)
"""The ``gradwatch db`` group."""


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrlOption = None) -> None:
    """Create or upgrade the database schema to the newest migration, then exit."""
    from ..config import Settings
    from ..store.db import upgrade_database

    url = database_url or Settings().database_url
    with database_errors("db upgrade", url):
        upgrade_database(url)
    typer.echo("database schema is up to date", err=True)


db_app.command("prune")(db_prune)
db_app.command("backup")(db_backup)
