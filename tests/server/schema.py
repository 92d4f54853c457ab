"""The schema revision a database is at, and the newest one the migrations define."""

from __future__ import annotations

from importlib.resources import as_file, files

from alembic.config import Config
from alembic.script import ScriptDirectory

from gradwatch.server.store.db import create_db_engine


def head_revision() -> str:
    """The newest alembic revision shipped with the server."""
    with as_file(files("gradwatch.server.store") / "alembic.ini") as ini:
        head = ScriptDirectory.from_config(Config(str(ini))).get_current_head()
    assert head is not None
    return head


def stored_revisions(url: str) -> list[str]:
    """The revisions recorded in a database's ``alembic_version`` table."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    finally:
        engine.dispose()
    return [row[0] for row in rows]
