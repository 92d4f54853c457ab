"""``gradwatch server`` as a real subprocess on 127.0.0.1, for tests and benchmarks.

The process is the console command a user runs, on a SQLite file (or any database URL), so a
test can stop it (gracefully or with SIGKILL) and start it again on the same port and data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

WAIT_SECONDS = 60.0
"""Bound of every wait for the sender or a server, in seconds."""


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``gradwatch server`` in a subprocess on a fixed port and SQLite file; restartable.

    ``database_url`` serves another database instead (PostgreSQL); ``database`` then only
    names the log file (``database`` with the suffix ``.log``).
    """

    def __init__(
        self,
        database: Path,
        port: int | None = None,
        *,
        command: Sequence[str] = (sys.executable, "-m", "gradwatch.server.cli"),
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        database_url: str | None = None,
    ) -> None:
        self.database = database
        self.database_url = database_url or f"sqlite:///{database}"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = database.with_suffix(".log")
        self._command = list(command)
        self._args = list(args)
        self._env = None if env is None else {**os.environ, **env}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and poll ``/healthz`` until it answers (bounded)."""
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self._command,
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--database-url",
                    self.database_url,
                    *self._args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            try:
                self.process.wait(timeout=0.05)  # the pause of the poll; also notices a crash
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"the server exited: {self.log.read_text(errors='replace')}")
        raise TimeoutError(f"the server did not answer /healthz in {WAIT_SECONDS}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: graceful; SIGKILL: at once) and wait until it has exited."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
