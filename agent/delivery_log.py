"""DeliveryLog: what the sender tells the user about delivery, each thing once, when it happens.

* the server refused to create the run (a wrong ``server`` path or token): an error with the
  URL tried and the server's message, and where the batches are kept;
* an outage: a warning at its first failed request (how long each batch is retried and what
  happens after), and one when the server answers again; the retries between stay quiet;
* a rejected request (4xx): an error, once per status code.

Thread-safe (its own lock, held only for the bookkeeping); never blocks beyond the log call.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .transport import RejectedError, RetryableError

__all__ = ["DeliveryLog"]

log = logging.getLogger("gradwatch.agent")


class DeliveryLog:
    """The sender's messages about one run's delivery.

    Args:
        run_id: The run.
        spool_directory: Where undelivered batches are kept, or ``None`` without a spool.
        retry_deadline_seconds: How long one request is retried before it is spooled.
    """

    def __init__(
        self, run_id: str, spool_directory: Path | None, retry_deadline_seconds: float
    ) -> None:
        self._run_id = run_id
        self._spool_directory = spool_directory
        self._deadline = retry_deadline_seconds
        self._lock = threading.Lock()
        self._refused: RejectedError | None = None
        self._down = False
        self._rejections: set[int] = set()

    @property
    def refused(self) -> str | None:
        """The server's refusal to create the run while it stands, or ``None``."""
        refused = self._refused
        return None if refused is None else str(refused)

    def run_refused(self, exc: RejectedError) -> None:
        """The server refused to create the run: an error, the first time."""
        with self._lock:
            first = self._refused is None
            self._refused = exc
        if not first:
            return
        kept = (
            f"they are kept in {self._spool_directory}"
            if self._spool_directory is not None
            else "without a spool they are dropped"
        )
        log.error(
            "gradwatch: the server refused to create run %s, so no step can be stored; check "
            "server= (the server's base URL, without /api/v1) and the token. %s. Batches are "
            "not sent; %s.",
            self._run_id,
            exc,
            kept,
        )

    def run_created(self) -> None:
        """The run exists on the server (a refusal no longer stands)."""
        with self._lock:
            self._refused = None

    def unreachable(self, exc: RetryableError) -> None:
        """A request failed transiently: a warning at the first failure of an outage."""
        with self._lock:
            first = not self._down
            self._down = True
        if first:
            after = (
                f"then keeps the batches in {self._spool_directory}"
                if self._spool_directory is not None
                else "then drops them (no spool)"
            )
            log.warning(
                "gradwatch: cannot reach the server (%s); retrying each batch for up to %g s, "
                "%s. Training is not affected.",
                exc,
                self._deadline,
                after,
            )

    def answered(self) -> None:
        """A request succeeded: say so if it ends an outage."""
        with self._lock:
            was_down = self._down
            self._down = False
        if was_down:
            log.warning("gradwatch: the server answers again; delivery resumed")

    def rejected(self, exc: RejectedError) -> None:
        """The server rejected a request: an error, once per status code."""
        with self._lock:
            first = exc.status_code not in self._rejections
            self._rejections.add(exc.status_code)
        if first:
            log.error("gradwatch: the server rejected a request; not retrying: %s", exc)

    def reset_after_fork(self) -> None:
        """Give a forked child its own lock (the parent's may have been held)."""
        self._lock = threading.Lock()
