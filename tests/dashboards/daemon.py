"""Prometheus' command-line tools and throwaway ``prometheus``/``alertmanager`` servers for tests.

The binaries come from Debian's ``prometheus`` and ``prometheus-alertmanager`` packages
(``.ci/run`` installs them). Without them tests skip, unless ``GRADWATCH_REQUIRE_PROMETHEUS=1``
(CI), which makes a missing binary a failure. :class:`Daemon` runs one server on 127.0.0.1 at
a free port with its data in a temporary folder; :meth:`Daemon.stop` ends it (and only it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TypeVar

import httpx
import pytest

__all__ = [
    "REQUIRE_ENV",
    "Daemon",
    "free_port",
    "require_tool",
    "run_tool",
    "skip_or_fail",
    "wait_for",
]

REQUIRE_ENV = "GRADWATCH_REQUIRE_PROMETHEUS"
"""When ``1``, a missing promtool, prometheus, amtool or alertmanager fails the test (CI)."""

_T = TypeVar("_T")

_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "alertmanager": "prometheus-alertmanager",
}
_DEBIAN_NAMES = {"alertmanager": "prometheus-alertmanager"}
"""Debian installs some binaries under another name."""


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``GRADWATCH_REQUIRE_PROMETHEUS=1`` (as CI sets)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Return the path of ``name`` (promtool, prometheus, amtool, alertmanager), or skip/fail."""
    path = shutil.which(name) or shutil.which(_DEBIAN_NAMES.get(name, name))
    if path is None:
        skip_or_fail(f"{name} not found; install it with: apt-get install {_PACKAGES[name]}")
    return path


def run_tool(args: Sequence[str], cwd: Path, timeout_seconds: float = 60.0) -> str:
    """Run a command-line tool and return its stdout; a non-zero exit fails with all output."""
    result = subprocess.run(
        list(args),
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout_seconds,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output}"
    return result.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(
    probe: Callable[[], _T | None], timeout_seconds: float, what: str, poll_seconds: float = 0.5
) -> _T:
    """Call ``probe`` until it returns something other than None; fail after the deadline.

    Blocks for at most ``timeout_seconds`` (plus one probe).
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        time.sleep(poll_seconds)


class Daemon:
    """One server process on 127.0.0.1, ready once ``GET {url}/-/ready`` answers 200.

    Args:
        name: For messages.
        argv: The command, given the port; it must listen on ``127.0.0.1:{port}``.
        log_path: Where the process' stdout and stderr go.

    Not thread-safe. :meth:`start` blocks until the server is ready (or fails);
    :meth:`stop` blocks until the process has exited.
    """

    def __init__(self, name: str, argv: Callable[[int], list[str]], log_path: Path) -> None:
        self.name = name
        self._argv = argv
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9090``."""
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the process' log, for failure messages."""
        if not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-chars:]

    def start(self, timeout_seconds: float = 60.0) -> Daemon:
        """Start the process and wait until it is ready; retries on another port if it dies."""
        for _attempt in range(3):
            self.port = free_port()
            with self._log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    self._argv(self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready(timeout_seconds):
                return self
            self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def _wait_ready(self, timeout_seconds: float) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False  # exited: perhaps the port was taken meanwhile
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return False

    def stop(self, timeout_seconds: float = 15.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout_seconds``). Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_seconds)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
