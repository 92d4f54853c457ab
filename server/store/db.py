"""Engine and session factories, and schema migration.

SQLite connections get WAL journaling, ``synchronous=NORMAL``, a busy timeout, foreign keys, a
page cache of :data:`SQLITE_CACHE_KIB` and checkpoints every :data:`SQLITE_CHECKPOINT_PAGES`
(see there).
Python's ``sqlite3`` does not emit ``BEGIN`` before reads and cannot begin a write transaction
up front, so this module takes over transaction control on SQLite: read sessions begin with a
plain ``BEGIN`` (a consistent snapshot under WAL) and write sessions with ``BEGIN IMMEDIATE``,
which takes the write lock first (waiting up to the busy timeout) instead of failing with
"database is locked" when two writers upgrade their read locks at once. PostgreSQL URLs
(``postgresql+psycopg://``) use the driver's ordinary transactions.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import as_file, files
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

__all__ = [
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "SQLITE_CACHE_KIB",
    "SQLITE_CHECKPOINT_PAGES",
    "Database",
    "check_database",
    "create_db_engine",
    "upgrade_database",
]

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
"""How long a SQLite connection waits for another writer before giving up."""

SQLITE_CACHE_KIB = 16384
"""Page cache of each SQLite connection, KiB (SQLite's default is 2000). A 500-layer batch
writes a block into each of ~1000 series, at the end of each series' key range: ~1000 leaf
pages that the next batch touches again. With 2 MB they were read back from the file every
batch; with 16 MiB the block inserts of a batch take ~3.4 ms instead of ~5.4 ms of CPU. The
cache grows only as pages are used, up to this much per pooled connection."""

SQLITE_CHECKPOINT_PAGES = 16384
"""WAL pages (4 KiB) after which a commit copies the WAL into the database file (SQLite's
default: 1000). Once a run holds ~14 blocks per series, each 500-layer batch dirties ~1000
leaf pages, so with the default every commit checkpointed: it copied and synced ~4 MiB, mostly
the pages the previous commits had copied already, and a batch took twice as long at step
20,000 as at step 1,000. Every ~16 batches, each tail page is copied once: at 20,000 steps
the ingest transaction takes ~38 ms a batch instead of ~60, and HTTP ingest stores ×1.2–1.3 the
samples per second (``python -m bench.ingest --sqlite-checkpoint-pages 1000`` compares). The
WAL file is truncated back to :data:`_SQLITE_WAL_KEEP_BYTES` after a checkpoint; a restart
reads at most that much WAL back (64 MiB of pages)."""

_SQLITE_WAL_KEEP_BYTES = 64 * 1024 * 1024

_BEGIN_OPTION = "gradwatch_sqlite_begin"
_LOCK_KEY = 0x67726164_77617463
"""PostgreSQL advisory lock key held while migrating ("gradwatc" in ASCII)."""


def create_db_engine(url: str) -> Engine:
    """Create an engine for ``url`` with gradwatch's connection settings.

    Does not connect (connections are opened lazily). The engine is thread-safe.

    Args:
        url: SQLAlchemy database URL, e.g. ``sqlite:///./gradwatch.db`` or
            ``postgresql+psycopg://user:pass@host/db``.

    Returns:
        A new engine; call :meth:`Engine.dispose` when done with it.
    """
    engine = create_engine(url, pool_pre_ping=make_url(url).get_backend_name() != "sqlite")
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    busy_ms = int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            _enable_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES}")
            cursor.execute(f"PRAGMA journal_size_limit = {_SQLITE_WAL_KEEP_BYTES}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _enable_wal(cursor: Any) -> None:
    """Switch a SQLite database to WAL journaling (persistent: once per database file).

    The switch needs an exclusive lock and SQLite does not apply the busy timeout to it, so
    a new database opened by several connections at once answers "database is locked" to
    all but one: retry, with a short backoff, for up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    delay = 0.001
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass(frozen=True, slots=True)
class Database:
    """An engine plus the two kinds of session gradwatch uses.

    Thread-safe: each call returns a new session; a session itself belongs to one thread.

    Attributes:
        engine: The shared engine.
    """

    engine: Engine

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """Open a session for queries; it is rolled back and closed on exit.

        Does not block until its first statement.
        """
        with Session(self.engine) as session:
            yield session

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """Open a session for a write transaction; the caller commits, exit rolls back the rest.

        On SQLite its first statement takes the database write lock (``BEGIN IMMEDIATE``),
        blocking up to :data:`SQLITE_BUSY_TIMEOUT_SECONDS` while another writer commits.
        """
        bind = self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        with Session(bind) as session:
            yield session


def check_database(engine: Engine) -> bool:
    """Run a trivial query; return whether the database answered.

    Blocks for one round trip (or up to the connect timeout when the database is down).
    Thread-safe.
    """
    try:
        with engine.connect() as connection:
            connection.execute(select(1)).scalar_one()
    except SQLAlchemyError:
        return False
    return True


def upgrade_database(url: str | Engine) -> None:
    """Bring the database schema to the newest revision (``alembic upgrade head``).

    Idempotent: an up-to-date database is left unchanged. Blocks while migrating; on SQLite it
    holds the write lock for the duration, on PostgreSQL a transaction-level advisory lock, so
    servers starting together migrate one after the other. Safe to call from any thread.

    Args:
        url: A database URL (an engine is created and disposed of here), or an existing
            engine to reuse (left open).
    """
    engine = create_db_engine(url) if isinstance(url, str) else url
    writer = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
    try:
        with (
            writer.begin() as connection,
            as_file(files("gradwatch.server.store") / "alembic.ini") as ini,
        ):
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            config = Config(str(ini))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        if isinstance(url, str):
            engine.dispose()
