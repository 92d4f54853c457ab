"""Transports: where the sender delivers runs and batches.

:class:`HttpTransport` is the only network I/O of the agent. It sends
gzip-encoded bodies with httpx (batches made in this process in the binary body of
:mod:`gradwatch.wire.binary`, JSON to a server that answers 415 to it, and everything
else as JSON) and classifies failures by the retry rules of
Prometheus remote-write and OTLP: connection errors, 5xx and 429 are
:class:`RetryableError` (with the server's ``Retry-After`` when given); any
other 4xx is a :class:`RejectedError` that must not be retried.
:class:`RetryPolicy` and :func:`call_with_retry` are the retry rule: exponential
backoff with full jitter, the server's ``Retry-After`` when it sends one, and a
deadline. Local mode's file transport is in :mod:`gradwatch.agent.local`.

Exceptions::

    TransportError
    ├── RetryableError   try again later (after ``retry_after_seconds`` if set)
    └── RejectedError    the server refused the request; retrying cannot help
        └── RunRejectedError  it refused to create the run (wrong URL or token)

Transports are used from the sender thread only; they are not thread-safe.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx

from gradwatch.wire.binary import MEDIA_TYPE

from .records import OutgoingBatch, StepBatch, as_wire

__all__ = [
    "HttpTransport",
    "RejectedError",
    "RetryPolicy",
    "RetryableError",
    "RunInfo",
    "RunRejectedError",
    "Transport",
    "TransportError",
    "call_with_retry",
    "parse_retry_after",
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


class RunRejectedError(RejectedError):
    """The server refused to create the run: a configuration error (a wrong ``server`` path,
    a wrong token), so batches are kept rather than counted as rejected."""


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

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        """Deliver one batch (idempotent by its ``batch_id``)."""
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
        self._binary = True
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._client = client or self._new_client()

    def create_run(self, run: RunInfo) -> None:
        self._request("POST", "/api/v1/runs", run.to_wire())

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        self.post_batch(run_id, batch)

    def post_batch(self, run_id: str, batch: OutgoingBatch) -> dict[str, Any]:
        """Send one batch and return the server's acknowledgement.

        A :class:`StepBatch` goes as the binary body until the server answers 415 to one
        (a server older than binary batches), then as JSON from this transport on; a wire
        dict goes as JSON. The reply says, among others, ``duplicate`` (nothing new stored)
        and ``stored_samples``; ``{}`` if it was not JSON.
        """
        path = f"/api/v1/runs/{run_id}/batches"
        if isinstance(batch, StepBatch) and self._binary:
            try:
                response = self._post(path, batch.to_binary(), MEDIA_TYPE, compress=True)
            except RejectedError as exc:
                if exc.status_code != 415:
                    raise
                self._binary = False
                log.warning(
                    "gradwatch: %s does not take binary batches (an older gradwatch server?); "
                    "sending JSON, which costs the training process ~25 ms of CPU per "
                    "500-layer batch: upgrade the server",
                    self._base_url,
                )
                response = self._request("POST", path, batch.to_wire(), compress=True)
        else:
            response = self._request("POST", path, as_wire(batch), compress=True)
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
        return self._post(path, content, "application/json", compress=compress, method=method)

    def _post(
        self,
        path: str,
        content: bytes,
        content_type: str,
        *,
        compress: bool,
        method: str = "POST",
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if compress:
            # Level 1: a 500-layer batch of 50 steps (800 KB of JSON) compresses in ~5 ms
            # instead of ~22 ms at level 5, in the training process, to 252 KB instead of 235;
            # its binary body (312 KB) in ~4 ms to 94 KB. zlib releases the GIL meanwhile.
            content = gzip.compress(content, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self._client.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:  # connect, read, write, pool errors and timeouts
            raise RetryableError(
                f"{method} {self._base_url}{path}: {type(exc).__name__}: {exc}"
            ) from exc
        status = response.status_code
        if status < 400:
            return response
        message = f"{method} {self._base_url}{path}: HTTP {status}: {response.text[:500]}"
        if status == 429 or status >= 500:
            raise RetryableError(message, parse_retry_after(response.headers.get("Retry-After")))
        raise RejectedError(message, status)
