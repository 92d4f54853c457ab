"""Transports: where the sender delivers runs and batches.

:class:`HttpTransport` is the only network I/O of the agent. It sends
gzip-encoded JSON with httpx and classifies failures by the retry rules of
Prometheus remote-write and OTLP: connection errors, 5xx and 429 are
:class:`RetryableError` (with the server's ``Retry-After`` when given); any
other 4xx is a :class:`RejectedError` that must not be retried.
:class:`JsonlTransport` writes the same wire dicts to a local file (local mode).

Exceptions::

    TransportError
    ├── RetryableError   try again later (after ``retry_after_seconds`` if set)
    └── RejectedError    the server refused the request; retrying cannot help

Transports are used from the sender thread only; they are not thread-safe.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

__all__ = [
    "HttpTransport",
    "JsonlTransport",
    "RejectedError",
    "RetryableError",
    "RunInfo",
    "Transport",
    "TransportError",
]


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the server needs to create a run."""

    run_id: str
    name: str
    project: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """Body of ``POST /api/v1/runs``."""
        return {
            "run_id": self.run_id,
            "name": self.name,
            "project": self.project,
            "config": self.config,
        }


class TransportError(Exception):
    """Delivery failed."""


class RetryableError(TransportError):
    """A transient failure: connection error, timeout, 5xx or 429.

    Attributes:
        retry_after_seconds: The server's ``Retry-After``, if it sent one.
    """

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class RejectedError(TransportError):
    """The server refused the request (4xx other than 429)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class Transport(Protocol):
    """Delivers runs, batches and status changes. Calls block until done or failed."""

    def create_run(self, run: RunInfo) -> None:
        """Create the run (idempotent)."""
        ...

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        """Deliver one wire batch (idempotent by its ``batch_id``)."""
        ...

    def set_status(self, run_id: str, status: str) -> None:
        """Set the run's status: ``running``, ``finished`` or ``failed``."""
        ...

    def close(self) -> None:
        """Release connections or files."""
        ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


class HttpTransport:
    """HTTP transport to a gradwatch server (blocking; use from one thread).

    Args:
        base_url: Server base URL, e.g. ``http://127.0.0.1:8000``.
        timeout_seconds: Timeout for connecting and for each read/write.
        token: Bearer token, if the server requires one.
        client: An ``httpx.Client`` to use instead of a new one (tests).
    """

    def __init__(
        self,
        base_url: str,
        timeout_seconds: float = 10.0,
        token: str | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        headers = {"User-Agent": "gradwatch-agent"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = client or httpx.Client(
            base_url=base_url, timeout=timeout_seconds, headers=headers
        )

    def create_run(self, run: RunInfo) -> None:
        self._request("POST", "/api/v1/runs", run.to_wire())

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        self._request("POST", f"/api/v1/runs/{run_id}/batches", batch, compress=True)

    def set_status(self, run_id: str, status: str) -> None:
        self._request("PATCH", f"/api/v1/runs/{run_id}", {"status": status})

    def close(self) -> None:
        self._client.close()

    def _request(
        self, method: str, path: str, body: dict[str, Any], compress: bool = False
    ) -> None:
        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        headers = {"Content-Type": "application/json"}
        if compress:
            content = gzip.compress(content, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self._client.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:  # connect, read, write, pool errors and timeouts
            raise RetryableError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status < 400:
            return
        message = f"{method} {path}: HTTP {status}: {response.text[:500]}"
        if status == 429 or status >= 500:
            raise RetryableError(message, parse_retry_after(response.headers.get("Retry-After")))
        raise RejectedError(message, status)


class JsonlTransport:
    """Local mode: one JSON-lines file per run, ``<directory>/<run_id>.jsonl``.

    Each line is ``{"kind": "run"|"batch"|"status", ...}``; ``gradwatch upload``
    replays a file to a server.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, run_id: str) -> Path:
        """File that holds the run's records."""
        return self._directory / f"{run_id}.jsonl"

    def create_run(self, run: RunInfo) -> None:
        self._append(run.run_id, {"kind": "run", **run.to_wire()})

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        self._append(run_id, {"kind": "batch", "batch": batch})

    def set_status(self, run_id: str, status: str) -> None:
        self._append(run_id, {"kind": "status", "status": status})

    def close(self) -> None:
        """Nothing to release: every append opens and closes the file."""

    def _append(self, run_id: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        try:
            with self.path_for(run_id).open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            raise RetryableError(f"writing {self.path_for(run_id)}: {exc}") from exc
