"""The ``gradwatch`` command: ``server``, ``demo``, ``db upgrade``, ``token`` and ``upload``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ..store.db import Database

__all__ = ["app", "main"]

app = typer.Typer(
    help="gradwatch: gradient-health monitoring for TensorFlow/Keras training.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or ./gradwatch.db."),
    ] = None,
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
            help="Requests per second per token (0: off); default $GRADWATCH_RATE_LIMIT_PER_SECOND"
            " or 20.",
        ),
    ] = None,
) -> None:
    """Run the gradwatch server (upgrades the database schema on start).

    Without API tokens the server is open, which it allows only on a loopback address unless
    --insecure is given; with tokens every API request needs one (Authorization: Bearer).
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
    uvicorn.run(create_app(settings), host=host, port=port)


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or ./gradwatch.db."),
    ] = None,
) -> None:
    """Create or upgrade the database schema to the newest migration, then exit."""
    from ..config import Settings
    from ..store.db import upgrade_database

    url = database_url or Settings().database_url
    upgrade_database(url)
    typer.echo("database schema is up to date", err=True)


token_app = typer.Typer(help="API tokens (per project, scopes ingest and read).")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    project: Annotated[str, typer.Option(help="Project the token may touch.")],
    scope: Annotated[
        list[str], typer.Option(help="ingest (send runs) or read (query); repeat for both.")
    ],
    name: Annotated[str, typer.Option(help="Who or what uses the token.")] = "",
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or ./gradwatch.db."),
    ] = None,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from ..auth import TokenScope, create_token
    from ..schemas import PROJECT_PATTERN

    try:
        scopes = [TokenScope(item) for item in scope]
    except ValueError:
        raise typer.BadParameter(
            f"{scope!r}: scopes are 'ingest' and 'read'", param_hint="--scope"
        ) from None
    if not re.match(PROJECT_PATTERN, project):
        raise typer.BadParameter("letters, digits and ._- only (1-100)", param_hint="--project")
    with _database(database_url) as database, database.write_session() as session:
        created = create_token(session, project, scopes, name, datetime.now(UTC))
    typer.echo(
        f"token {created.key} for project {created.project!r}, scopes "
        f"{', '.join(sorted(created.scopes))}; it is shown only now:",
        err=True,
    )
    typer.echo(created.token)


@token_app.command("list")
def token_list(
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or ./gradwatch.db."),
    ] = None,
) -> None:
    """List tokens (keys, projects, scopes; never the secrets)."""
    from rich.console import Console
    from rich.table import Table

    from ..auth import list_tokens

    with _database(database_url) as database, database.read_session() as session:
        tokens = list_tokens(session)
    table = Table("key", "project", "scopes", "name", "created", "revoked")
    for info in tokens:
        table.add_row(
            info.key,
            info.project,
            ",".join(sorted(info.scopes)),
            info.name,
            info.created_at.isoformat(timespec="seconds"),
            "" if info.revoked_at is None else info.revoked_at.isoformat(timespec="seconds"),
        )
    Console().print(table)


@token_app.command("revoke")
def token_revoke(
    key: Annotated[str, typer.Argument(help="The token's key (see gradwatch token list).")],
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or ./gradwatch.db."),
    ] = None,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    from ..auth import revoke_token

    with _database(database_url) as database, database.write_session() as session:
        revoked = revoke_token(session, key, datetime.now(UTC))
    if not revoked:
        typer.echo(f"no valid token has key {key!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"token {key} revoked", err=True)


@contextmanager
def _database(database_url: str | None) -> Iterator[Database]:
    """Open the database (schema upgraded first) for a CLI command; disposed on exit."""
    from ..config import Settings
    from ..store.db import Database, create_db_engine, upgrade_database

    engine = create_db_engine(database_url or Settings().database_url)
    try:
        upgrade_database(engine)
        yield Database(engine)
    finally:
        engine.dispose()


@app.command()
def demo(
    server: Annotated[
        str | None, typer.Option(help="Stream to this server instead of an embedded one.")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database of the embedded server (default: a temp file).")
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Epochs per run (64 steps each). The exploding run explodes after 80% of its "
            "steps; the server's detectors learn a baseline over 200 steps first, so explosion "
            "events need at least 4 epochs.",
        ),
    ] = 5,
    keep_serving: Annotated[
        bool, typer.Option(help="Keep the embedded server up after the runs, until Ctrl-C.")
    ] = False,
) -> None:
    """Train a stable and an exploding Keras run and stream both to a server."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    try:
        import keras  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the demo needs TensorFlow: pip install 'gradwatch[all]'", param_hint="demo"
        ) from None
    from .demo import run_demo

    run_demo(server=server, database_url=database_url, epochs=epochs, keep_serving=keep_serving)


@app.command()
def upload(
    path: Annotated[
        str,
        typer.Argument(
            help="A local-mode run file (*.jsonl), a directory of them, or a spool directory "
            "(one run's, or the whole spool root)."
        ),
    ],
    server: Annotated[str, typer.Option(help="Server base URL, e.g. http://127.0.0.1:8000.")],
    token: Annotated[
        str | None,
        typer.Option(envvar="GRADWATCH_TOKEN", help="API token, if the server requires one."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Timeout of one request, seconds.")
    ] = 30.0,
    retry_deadline: Annotated[
        float, typer.Option(min=0.1, help="How long to retry one request (5xx, 429), seconds.")
    ] = 60.0,
) -> None:
    """Send local runs or a leftover spool to a server; uploading twice stores nothing new.

    Each run is created if missing, its batches are sent in step order (batches the server
    already has are acknowledged without storing anything) and its last status is set.
    The files are only read. Exits with 1 if a batch could not be uploaded.
    """
    import os
    from pathlib import Path

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    from gradwatch.agent.config import ConfigError, check_server_url
    from gradwatch.agent.transport import HttpTransport, RetryPolicy
    from gradwatch.agent.upload import UploadResult
    from gradwatch.agent.upload import upload as upload_runs

    try:
        url = check_server_url(server)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--server") from None

    def report(result: UploadResult) -> None:
        typer.echo(
            f"{result.source}: run {result.name!r} ({result.run_id}): {result.batches} batches, "
            f"{result.stored} stored, {result.duplicates} already stored, {result.failed} failed"
            + (f"; status {result.status}" if result.status else "")
        )

    transport = HttpTransport(url, timeout_seconds=timeout, token=token)
    try:
        results = upload_runs(
            Path(path), transport, RetryPolicy(deadline_seconds=retry_deadline), on_result=report
        )
    except (OSError, ValueError) as error:
        typer.echo(f"gradwatch upload: {error}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        transport.close()
    if not all(result.ok for result in results):
        raise typer.Exit(code=1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
