"""Migrations create exactly the schema the models declare; nothing happens at import time."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from gradwatch.server.store.db import create_db_engine, upgrade_database
from gradwatch.server.store.models import Base
from tests.server.schema import head_revision, stored_revisions


def test_migrations_match_models(make_database_url, backend):
    url = make_database_url(migrated=False)
    upgrade_database(url)
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diffs = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
            if backend == "sqlite":
                blocks_sql = connection.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE name = 'blocks'"
                ).scalar_one()
                assert "WITHOUT ROWID" in blocks_sql
            else:  # migration 0007: room for heap-only updates of the running summaries
                options = connection.exec_driver_sql(
                    "SELECT reloptions FROM pg_class WHERE relname = 'series'"
                ).scalar_one()
                assert options == ["fillfactor=50"]
    finally:
        engine.dispose()

    assert diffs == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_migrations_upgrade_is_idempotent(make_database_url):
    url = make_database_url(migrated=False)
    upgrade_database(url)
    upgrade_database(url)
    assert stored_revisions(url) == [head_revision()]


def test_migrations_sqlite_pragmas(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()
                for name in (
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "busy_timeout",
                    "cache_size",
                    "wal_autocheckpoint",
                    "journal_size_limit",
                )
            }
    finally:
        engine.dispose()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "busy_timeout": 30000,
        "cache_size": -16384,  # KiB: the ~1000 leaf pages a 500-layer batch writes stay cached
        "wal_autocheckpoint": 16384,  # pages: not every commit of such a batch checkpoints
        "journal_size_limit": 64 * 1024 * 1024,
    }


def test_import_app_imports_no_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "import gradwatch.server.app\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')"
        " or m.startswith('gradwatch.agent')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_migrations_concurrent_upgrades_all_succeed(make_database_url):
    url = make_database_url(migrated=False)
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda _: upgrade_database(url), range(3)))
    assert stored_revisions(url) == [head_revision()]
