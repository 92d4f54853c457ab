"""Run a real uvicorn server in a background thread of the current process.

Used by ``gradwatch demo`` and by the end-to-end tests: the server listens on a
real TCP socket on 127.0.0.1 (port 0 picks a free one), exactly as
``gradwatch server`` would, but starts in well under a second and stops with
the context manager.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .config import Settings

__all__ = ["EmbeddedServer"]


class EmbeddedServer:
    """A uvicorn server on a background thread.

    Args:
        settings: Server settings (database URL and limits).
        host: Address to bind; loopback by default.
        port: Port to bind; ``0`` picks a free one.
        app: The app to serve (built by ``create_app(settings)`` and perhaps given extra
            routes, as benchmarks do); None builds it.

    Thread-safety: start and stop from one thread. ``start`` blocks until the
    server accepts connections (or raises after ``timeout_seconds``).
    """

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        app: FastAPI | None = None,
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(
            create_app(settings) if app is None else app,
            log_level="warning",
            lifespan="on",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="gradwatch-embedded-server",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_seconds: float = 30.0) -> EmbeddedServer:
        """Start serving; blocks until the server is up."""
        self._thread.start()
        deadline = time.monotonic() + timeout_seconds
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the embedded gradwatch server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the embedded server did not start in {timeout_seconds}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Ask the server to finish in-flight requests and stop; blocks until it has."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_seconds)
        self._sock.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
