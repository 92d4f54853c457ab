"""Transports: where the sender delivers runs and batches.

:class:`HttpTransport` is the only network I/O of the agent. It sends
gzip-encoded JSON with httpx and classifies failures by the retry rules of
Prometheus remote-write and OTLP: connection errors, 5xx and 429 are
:class:`RetryableError` (with the server's ``Retry-After`` when given); any
other 4xx is a :class:`RejectedError` that must not be retried.
:class:`RetryPolicy` and :func:`call_with_retry` are the retry rule: exponential
backoff with full jitter, the server's ``Retry-After`` when it sends one, and a
deadline. :class:`JsonlTransport` writes the same wire dicts to a local file
(local mode) and :func:`read_run_file` reads one back.

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
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from gradwatch.wire import decode_float

__all__ = [
    "HttpTransport",
    "JsonlTransport",
    "LocalSummary",
    "RejectedError",
    "RetryPolicy",
    "RetryableError",
    "RunFile",
    "RunInfo",
    "Transport",
    "TransportError",
    "call_with_retry",
    "parse_retry_after",
    "read_run_file",
]

log = logging.getLogger("gradwatch.agent")

_T = TypeVar("_T")

_MAX_RETRY_AFTER_SECONDS = 3600.0
"""Longest ``Retry-After`` honoured; a larger one (or a far-away date) is cut to this."""


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

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RunInfo:
        """Inverse of :meth:`to_wire`.

        Raises:
            ValueError: A field is missing or has the wrong type.
        """
        try:
            config = wire.get("config") or {}
            if not isinstance(config, dict):
                raise TypeError("config is not an object")
            return cls(
                run_id=str(wire["run_id"]),
                name=str(wire["name"]),
                project=str(wire["project"]),
                config=dict(config),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a run: {exc!r}") from exc


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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a deadline.

    Attributes:
        initial_backoff_seconds: Upper bound of the first wait, seconds.
        max_backoff_seconds: Cap of any single wait, seconds.
        deadline_seconds: Give up on a request this long after its first try, seconds.
    """

    initial_backoff_seconds: float = 0.25
    max_backoff_seconds: float = 10.0
    deadline_seconds: float = 60.0

    def backoff_seconds(self, attempt: int, rng: random.Random) -> float:
        """Wait before retry number ``attempt`` (0-based): uniform in [0, cap], seconds."""
        cap = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2.0 ** min(attempt, 64))
        return rng.uniform(0.0, cap)


def call_with_retry(
    call: Callable[[], _T],
    policy: RetryPolicy,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], bool] | None = None,
) -> _T:
    """Call ``call`` until it succeeds, retrying :class:`RetryableError` by ``policy``.

    Waits the server's ``Retry-After`` when it sent one, else the policy's
    backoff; gives up (re-raising the last error) when the next wait would end
    past the deadline. A :class:`RejectedError` is raised at once. Blocks for
    the waits; thread-safe if ``call`` is.

    Args:
        call: The request.
        policy: Backoff and deadline.
        rng: Source of jitter.
        clock: Monotonic clock, seconds.
        sleep: ``sleep(seconds)`` waits and returns ``True``, or returns
            ``False`` early to give up (shutdown); ``time.sleep`` by default.

    Raises:
        RetryableError: Still failing at the deadline, or ``sleep`` gave up.
        RejectedError: The server refused the request.
    """
    rng = rng or random.Random()
    start = clock()
    attempt = 0
    while True:
        try:
            return call()
        except RetryableError as exc:
            wait = exc.retry_after_seconds
            if wait is None:
                wait = policy.backoff_seconds(attempt, rng)
            attempt += 1
            if clock() - start + wait > policy.deadline_seconds:
                log.warning("gradwatch: giving up after %d attempts: %s", attempt, exc)
                raise
            log.debug("gradwatch: retrying in %.2fs: %s", wait, exc)
            if sleep is None:
                time.sleep(wait)
            elif not sleep(wait):
                raise


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
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date).

    At most one hour; ``None`` when the header is missing or does not parse.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)  # delta-seconds (fractions accepted)
    except ValueError:
        pass
    else:
        return min(seconds, _MAX_RETRY_AFTER_SECONDS) if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    wall = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - wall), _MAX_RETRY_AFTER_SECONDS)


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
        self._base_url = base_url
        self._timeout_seconds = timeout_seconds
        self._headers = {"User-Agent": "gradwatch-agent"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._client = client or self._new_client()

    def create_run(self, run: RunInfo) -> None:
        self._request("POST", "/api/v1/runs", run.to_wire())

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        self.post_batch(run_id, batch)

    def post_batch(self, run_id: str, batch: dict[str, Any]) -> dict[str, Any]:
        """Send one wire batch and return the server's acknowledgement.

        The reply says, among others, ``duplicate`` (nothing new stored) and
        ``stored_samples``; ``{}`` if it was not JSON.
        """
        response = self._request("POST", f"/api/v1/runs/{run_id}/batches", batch, compress=True)
        try:
            ack = response.json()
        except ValueError:
            return {}
        return ack if isinstance(ack, dict) else {}

    def set_status(self, run_id: str, status: str) -> None:
        self._request("PATCH", f"/api/v1/runs/{run_id}", {"status": status})

    def close(self) -> None:
        self._client.close()

    def reset_after_fork(self) -> None:
        """In a forked child: open a new connection pool, leaving the parent's alone.

        The parent's sockets are shared with the child; closing them here could
        disturb the parent's requests, so the old client is dropped unclosed.
        """
        self._client = self._new_client()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self._base_url, timeout=self._timeout_seconds, headers=self._headers
        )

    def _request(
        self, method: str, path: str, body: dict[str, Any], compress: bool = False
    ) -> httpx.Response:
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
            return response
        message = f"{method} {path}: HTTP {status}: {response.text[:500]}"
        if status == 429 or status >= 500:
            raise RetryableError(message, parse_retry_after(response.headers.get("Retry-After")))
        raise RejectedError(message, status)


@dataclass(frozen=True, slots=True)
class LocalSummary:
    """Totals of the batches a :class:`JsonlTransport` wrote for one run.

    Attributes:
        path: The run's file.
        steps: Steps written.
        max_global_norm: Largest global gradient norm (before clipping), ignoring
            NaN; ``None`` when no step had one.
        clipped_steps: Steps whose clip coefficient was below 1.
        skipped_steps: Steps whose update was skipped.
        nonfinite_steps: Steps with a NaN/±Inf gradient value or global norm.
    """

    path: Path
    steps: int = 0
    max_global_norm: float | None = None
    clipped_steps: int = 0
    skipped_steps: int = 0
    nonfinite_steps: int = 0

    def describe(self, run_name: str) -> str:
        """Two human-readable lines for the end of training."""
        norm = "n/a" if self.max_global_norm is None else f"{self.max_global_norm:.4g}"
        return (
            f"gradwatch: run {run_name!r}: {self.steps} steps, max global norm {norm}, "
            f"{self.clipped_steps} clipped, {self.skipped_steps} skipped, "
            f"{self.nonfinite_steps} non-finite\n"
            f"gradwatch: written to {self.path} "
            f"(send it to a server with: gradwatch upload {self.path} --server URL)"
        )

    def add(self, batch: Mapping[str, Any]) -> LocalSummary:
        """This summary plus one wire batch."""
        norms = [_wire_float(v) for v in batch["global_norm"]]
        coefs = [_wire_float(v) for v in batch["clip_coef"]]
        nonfinite_rows = [any(int(c) > 0 for c in row) for row in batch["nonfinite"]]
        known = [v for v in norms if not math.isnan(v)]
        biggest = max(known, default=None)
        if self.max_global_norm is not None and (biggest is None or self.max_global_norm > biggest):
            biggest = self.max_global_norm
        return LocalSummary(
            path=self.path,
            steps=self.steps + len(norms),
            max_global_norm=biggest,
            clipped_steps=self.clipped_steps + sum(c < 1.0 for c in coefs),
            skipped_steps=self.skipped_steps + sum(bool(s) for s in batch["skipped"]),
            nonfinite_steps=self.nonfinite_steps
            + sum(
                row or not math.isfinite(norm)
                for row, norm in zip(nonfinite_rows, norms, strict=True)
            ),
        )


def _wire_float(value: Any) -> float:
    """A wire float of a batch this process wrote itself; ``None`` (unknown) reads as NaN."""
    return math.nan if value is None else decode_float(value)


class JsonlTransport:
    """Local mode: one JSON-lines file per run, ``<directory>/<run_id>.jsonl``.

    Each line is ``{"kind": "run"|"batch"|"status", ...}``; ``gradwatch upload``
    replays a file to a server. Keeps a running :class:`LocalSummary` per run.

    Args:
        directory: Where the files go (created if missing).

    Raises:
        OSError: The directory cannot be created.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._directory.mkdir(parents=True, exist_ok=True)
        self._summaries: dict[str, LocalSummary] = {}
        self._lock = threading.Lock()

    def path_for(self, run_id: str) -> Path:
        """File that holds the run's records."""
        return self._directory / f"{run_id}.jsonl"

    def summary(self, run_id: str) -> LocalSummary:
        """Totals of the batches written for ``run_id`` so far (thread-safe)."""
        with self._lock:
            return self._summaries.get(run_id) or LocalSummary(self.path_for(run_id))

    def create_run(self, run: RunInfo) -> None:
        self._append(run.run_id, {"kind": "run", **run.to_wire()})

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        self._append(run_id, {"kind": "batch", "batch": batch})
        with self._lock:
            summary = self._summaries.get(run_id) or LocalSummary(self.path_for(run_id))
            self._summaries[run_id] = summary.add(batch)

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


@dataclass(frozen=True, slots=True)
class RunFile:
    """The contents of a local-mode run file.

    Attributes:
        run: The run (from its first ``run`` record).
        batches: Wire batches in file order.
        status: The last status recorded, if any.
        unreadable_lines: Lines that did not parse (a process killed mid-write).
    """

    run: RunInfo
    batches: list[dict[str, Any]]
    status: str | None
    unreadable_lines: int


def read_run_file(path: Path) -> RunFile:
    """Read a file written by :class:`JsonlTransport` (blocks on disk I/O).

    Raises:
        OSError: The file cannot be read.
        ValueError: It holds no ``run`` record.
    """
    run: RunInfo | None = None
    batches: list[dict[str, Any]] = []
    status: str | None = None
    unreadable = 0
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind = record["kind"]
                if kind == "run" and run is None:
                    run = RunInfo.from_wire(record)
                elif kind == "batch":
                    if not isinstance(record["batch"], dict):
                        raise TypeError("batch is not an object")
                    batches.append(record["batch"])
                elif kind == "status":
                    status = str(record["status"])
            except (ValueError, KeyError, TypeError):
                unreadable += 1
    if run is None:
        raise ValueError(f"{path}: not a gradwatch run file (no run record)")
    return RunFile(run=run, batches=batches, status=status, unreadable_lines=unreadable)
