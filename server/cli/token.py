"""``gradwatch token create|list|revoke``: manage API tokens in the database."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from .database import DatabaseUrlOption, open_database

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from ..store.db import Database

__all__ = ["token_app"]


token_app = typer.Typer(help="API tokens (per project, scopes ingest and read).")
"""The ``gradwatch token`` group."""


@token_app.command("create")
def token_create(
    project: Annotated[str, typer.Option(metavar="PROJECT", help="Project the token may touch.")],
    scope: Annotated[
        list[str],
        typer.Option(metavar="SCOPE", help="ingest (send runs) or read (query); repeat for both."),
    ],
    name: Annotated[str, typer.Option(metavar="NAME", help="Who or what uses the token.")] = "",
    database_url: DatabaseUrlOption = None,
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
    with _open(database_url, "token create") as database, database.write_session() as session:
        created = create_token(session, project, scopes, name, datetime.now(UTC))
    typer.echo(
        f"token {created.key} for project {created.project!r}, scopes "
        f"{', '.join(sorted(created.scopes))}; it is shown only now:",
        err=True,
    )
    typer.echo(created.token)


@token_app.command("list")
def token_list(
    database_url: DatabaseUrlOption = None,
) -> None:
    """List tokens (keys, projects, scopes; never the secrets)."""
    from rich.console import Console
    from rich.table import Table

    from ..auth import list_tokens

    with _open(database_url, "token list") as database, database.read_session() as session:
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
    key: Annotated[
        str, typer.Argument(metavar="KEY", help="The token's key (see gradwatch token list).")
    ],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    from ..auth import revoke_token

    with _open(database_url, "token revoke") as database, database.write_session() as session:
        revoked = revoke_token(session, key, datetime.now(UTC))
    if not revoked:
        typer.echo(f"no valid token has key {key!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"token {key} revoked", err=True)


def _open(database_url: str | None, command: str) -> AbstractContextManager[Database]:
    """The database for a token command, created when missing (tokens come before a server)."""
    from ..config import Settings

    return open_database(database_url or Settings().database_url, command, must_exist=False)
