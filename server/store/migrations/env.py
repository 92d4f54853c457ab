"""Alembic environment: migrates the connection handed over by ``upgrade_database``.

Run from the alembic CLI, it builds its own engine from ``-x url=...`` (or ``sqlalchemy.url``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from gradwatch.server.store.db import create_db_engine
from gradwatch.server.store.models import Base


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _migrate(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no database: pass -x url=<sqlalchemy url>")
    engine = create_db_engine(url)
    try:
        with engine.connect() as own_connection:
            _migrate(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("gradwatch migrations run online only (upgrade_database or alembic -x url=)")
_run()
