"""Online backups: SQLite's backup API, PostgreSQL's ``pg_dump -Fc``.

Both are consistent snapshots taken while the server keeps writing:

* SQLite: :meth:`sqlite3.Connection.backup` copies every page in one step under one read
  transaction. Under WAL a reader never blocks writers, so ingest goes on; and one step
  (rather than several) matters, because a step-wise backup restarts from scratch whenever
  another connection writes between steps, which a busy server always does.
* PostgreSQL: ``pg_dump --format=custom`` reads the database in one repeatable-read
  snapshot, without blocking writes; ``pg_restore`` restores it.

A backup is written next to its destination under a temporary name and renamed into place
only once complete (and, for SQLite, once ``PRAGMA quick_check`` passes), so a failed or
interrupted backup never leaves a truncated file under the destination's name. Calls block
until the backup is written; they are safe to call from any thread.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from .db import SQLITE_BUSY_TIMEOUT_SECONDS

__all__ = ["BackupError", "backup_database", "find_pg_dump"]


class BackupError(Exception):
    """A backup could not be made; the message says why in one line."""


def backup_database(database_url: str, destination: Path, *, overwrite: bool = False) -> int:
    """Back up the database at ``database_url`` to the file ``destination``.

    SQLite URLs get a copy of the database file (open it with ``sqlite:///DESTINATION``);
    PostgreSQL URLs a ``pg_dump`` custom-format archive (restore with ``pg_restore``).

    Args:
        database_url: SQLAlchemy URL of the database to back up.
        destination: File to write.
        overwrite: Replace ``destination`` if it exists; otherwise an existing file is an error.

    Returns:
        Bytes written.

    Raises:
        BackupError: The URL's backend has no backup here, the source or ``pg_dump`` is
            missing, the destination exists, or the copy failed.
        sqlalchemy.exc.ArgumentError: ``database_url`` does not parse.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if destination.exists() and not overwrite:
        raise BackupError(f"{destination} exists; remove it or pass --force to replace it")
    if not destination.parent.is_dir():
        raise BackupError(f"folder {destination.parent} does not exist")
    if backend == "sqlite":
        _backup_sqlite(url, destination)
    elif backend == "postgresql":
        _backup_postgres(url, destination)
    else:
        raise BackupError(f"no backup for {backend!r} databases (SQLite and PostgreSQL only)")
    return destination.stat().st_size


@contextmanager
def _partial_file(destination: Path) -> Iterator[Path]:
    """A temporary path next to ``destination``, renamed to it on success, removed on error."""
    handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def _backup_sqlite(url: URL, destination: Path) -> None:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise BackupError("an in-memory or URI SQLite database cannot be backed up; name a file")
    source_path = Path(database)
    if not source_path.is_file():
        raise BackupError(f"no SQLite database at {source_path}")
    # mode=rw: never create a missing source; the busy timeout covers WAL recovery locks.
    source = sqlite3.connect(
        f"{source_path.resolve().as_uri()}?mode=rw",
        uri=True,
        timeout=SQLITE_BUSY_TIMEOUT_SECONDS,
    )
    try:
        with _partial_file(destination) as partial:
            target = sqlite3.connect(partial)
            try:
                source.backup(target)  # pages=-1: one step, one snapshot (module docstring)
                verdict = target.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                target.close()
            if verdict != "ok":
                raise BackupError(f"the copy failed its integrity check: {verdict}")
    except sqlite3.Error as error:
        raise BackupError(f"SQLite backup of {source_path} failed: {error}") from None
    finally:
        source.close()


def find_pg_dump() -> Path | None:
    """Return the ``pg_dump`` to use: the one on ``PATH``, else the newest Debian one in
    ``/usr/lib/postgresql/<version>/bin``; None when there is none."""
    on_path = shutil.which("pg_dump")
    if on_path is not None:
        return Path(on_path)
    versions = sorted(
        (Path(path) for path in glob.glob("/usr/lib/postgresql/*/bin/pg_dump")),
        key=lambda path: int(path.parents[1].name) if path.parents[1].name.isdigit() else 0,
        reverse=True,
    )
    return versions[0] if versions else None


def _backup_postgres(url: URL, destination: Path) -> None:
    pg_dump = find_pg_dump()
    if pg_dump is None:
        raise BackupError(
            "pg_dump not found on PATH or in /usr/lib/postgresql/*/bin; install the PostgreSQL "
            "client tools (Debian/Ubuntu: apt-get install postgresql-client) in a version at "
            "least the server's"
        )
    # libpq reads the URI without the driver suffix; the password travels in the environment,
    # not on the command line where `ps` would show it.
    conninfo = url.set(drivername="postgresql", password=None).render_as_string()
    environment = dict(os.environ)
    if url.password is not None:
        environment["PGPASSWORD"] = str(url.password)
    with _partial_file(destination) as partial:
        result = subprocess.run(
            [str(pg_dump), "--format=custom", f"--file={partial}", f"--dbname={conninfo}"],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env=environment,
        )
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if "error" in line.lower()]
            detail = (errors or lines or [f"exit status {result.returncode}"])[0]
            raise BackupError(f"{pg_dump} failed: {detail}")
