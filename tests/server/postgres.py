"""A throwaway PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` binaries).

:class:`PostgresCluster` runs ``initdb`` into a fresh temporary directory and starts the server
with ``pg_ctl`` on 127.0.0.1 at a free port, trust authentication on loopback only (no
password exists anywhere), Unix sockets inside the data directory. ``initdb`` refuses to run
as root, so as root every PostgreSQL command runs as the ``postgres`` system user (which the
Debian package creates). :meth:`PostgresCluster.stop` stops the server and deletes the data.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REQUIRE_ENV", "PostgresCluster", "find_postgres_bin"]

REQUIRE_ENV = "GRADWATCH_REQUIRE_POSTGRES"
"""When ``1``, a missing PostgreSQL is a test failure instead of a skip (CI sets it)."""

_USER = "postgres"
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
"""Durability off: a test cluster is thrown away anyway. Benchmarks keep the defaults."""


def find_postgres_bin() -> Path | None:
    """Return the folder holding ``initdb`` and ``pg_ctl``, or None when not installed.

    Prefers the newest ``/usr/lib/postgresql/<version>/bin`` (Debian keeps it off ``PATH``),
    then ``PATH``.
    """
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(pg_ctl)).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL server on 127.0.0.1 with its own temporary data directory.

    Blocking: :meth:`start` returns once the server accepts connections. Not thread-safe;
    create databases from one thread.

    Args:
        bin_dir: Folder with ``initdb`` and ``pg_ctl``.
        durable: Keep PostgreSQL's default durability (fsync on); tests turn it off.
    """

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self._bin = bin_dir
        self._durable = durable
        self._as_postgres = os.geteuid() == 0
        self._root = Path(tempfile.mkdtemp(prefix="gradwatch-pg-"))
        self._data = self._root / "data"
        self._log = self._root / "server.log"
        self.port = 0
        self._started = False
        self._counter = 0

    def _run(self, args: Sequence[str]) -> None:
        result = subprocess.run(
            [str(self._bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            user=_USER if self._as_postgres else None,
        )
        if result.returncode != 0:
            log = self._log.read_text(errors="replace") if self._log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}{log[-2000:]}"
            )

    def start(self) -> PostgresCluster:
        """Create the data directory and start the server (blocks until it is ready)."""
        if self._as_postgres:
            owner = pwd.getpwnam(_USER)
            os.chown(self._root, owner.pw_uid, owner.pw_gid)
        self._root.chmod(0o700)
        self._run(
            [
                "initdb",
                "-D",
                str(self._data),
                "-U",
                _USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        settings = [
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={self._data}",
            "max_connections=200",
            *([] if self._durable else _FAST_SETTINGS),
        ]
        options = " ".join(f"-c {setting}" for setting in settings)
        last_error: RuntimeError | None = None
        for _ in range(5):
            self.port = _free_port()
            try:
                self._run(
                    [
                        "pg_ctl",
                        "start",
                        "-w",
                        "-t",
                        "60",
                        "-D",
                        str(self._data),
                        "-l",
                        str(self._log),
                        "-o",
                        f"-p {self.port} {options}",
                    ]
                )
            except RuntimeError as error:  # port taken between probe and bind: try another
                last_error = error
                continue
            self._started = True
            return self
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def stop(self) -> None:
        """Stop the server (immediately) and delete its data. Idempotent."""
        if self._started:
            self._started = False
            with contextlib.suppress(RuntimeError):
                self._run(["pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self._data)])
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of a database of this server (psycopg 3 driver, no password)."""
        return f"postgresql+psycopg://{_USER}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Any]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=_USER, dbname="postgres", autocommit=True
        ) as connection:
            yield connection

    def create_database(self, template: str | None = None, name: str | None = None) -> str:
        """Create an empty database (or a copy of ``template``); return its SQLAlchemy URL."""
        from psycopg import sql

        if name is None:
            self._counter += 1
            name = f"gw_{os.getpid()}_{self._counter}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as connection:
            connection.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection still open to it."""
        from psycopg import sql

        with self._admin() as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
