"""Background delivery of batches: a bounded queue and one daemon thread.

The training thread only ever calls :meth:`Sender.submit`, which never waits
on the network: when the queue is full the batch is dropped and counted. The
sender thread serialises batches, delivers them through a
:class:`~gradwatch.agent.transport.Transport` and retries transient failures
with exponential backoff and full jitter, honouring the server's
``Retry-After``, until a per-request deadline. No exception raised by a
transport ever reaches the caller.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from gradwatch.agent.records import StepBatch
from gradwatch.agent.transport import RejectedError, RetryableError, RunInfo, Transport

__all__ = ["DropReason", "RetryPolicy", "Sender"]

log = logging.getLogger("gradwatch.agent")


class DropReason:
    """Why a batch was not delivered (the ``reason`` label of drop counters)."""

    QUEUE_FULL = "queue_full"
    SERVER_UNAVAILABLE = "server_unavailable"
    REJECTED = "rejected"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a deadline.

    Attributes:
        initial_backoff_seconds: Upper bound of the first wait.
        max_backoff_seconds: Cap of any single wait.
        deadline_seconds: Give up on a request after this long.
    """

    initial_backoff_seconds: float = 0.25
    max_backoff_seconds: float = 10.0
    deadline_seconds: float = 60.0

    def backoff_seconds(self, attempt: int, rng: random.Random) -> float:
        """Wait before retry number ``attempt`` (0-based), seconds."""
        cap = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2.0**attempt)
        return rng.uniform(0.0, cap)


@dataclass(frozen=True, slots=True)
class _Status:
    status: str


class _GiveUpError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sender:
    """Delivers a run's batches from a daemon thread.

    Thread-safe: ``submit``, ``set_status``, ``flush`` and ``close`` may be
    called from any thread. Only ``flush`` and ``close`` block, and only up to
    their timeout.

    Args:
        transport: Where to deliver; used from the sender thread only.
        run: The run to create before the first batch.
        queue_size: Most batches held in memory.
        retry: Retry policy for transient failures.
        clock: Monotonic clock, seconds (injectable for tests).
        rng: Source of jitter (injectable for tests).
    """

    def __init__(
        self,
        transport: Transport,
        run: RunInfo,
        queue_size: int = 1000,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._transport = transport
        self._run = run
        self._queue_size = queue_size
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._rng = rng or random.Random()
        self._items: deque[StepBatch | _Status] = deque()
        self._queued_batches = 0
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._abort = threading.Event()
        self._run_created = False
        self._dropped: Counter[str] = Counter()
        self._sent_batches = 0
        self._sent_steps = 0
        self._logged_rejections: set[int] = set()
        self._thread = threading.Thread(target=self._loop, name="gradwatch-sender", daemon=True)
        self._thread.start()

    # -- training-thread API ---------------------------------------------------------------

    def submit(self, batch: StepBatch) -> bool:
        """Queue a batch for delivery without waiting.

        Returns:
            ``False`` if the queue was full or the sender closed (the batch is
            dropped and counted), else ``True``.
        """
        with self._cond:
            if self._closing:
                self._dropped[DropReason.SHUTDOWN] += 1
                return False
            if self._queued_batches >= self._queue_size:
                self._dropped[DropReason.QUEUE_FULL] += 1
                return False
            self._items.append(batch)
            self._queued_batches += 1
            self._cond.notify_all()
            return True

    def set_status(self, status: str) -> None:
        """Queue a run status change (``finished``/``failed``) after pending batches."""
        with self._cond:
            if not self._closing:
                self._items.append(_Status(status))
                self._cond.notify_all()

    def flush(self, timeout_seconds: float) -> bool:
        """Block until everything queued so far is handled, or the timeout passes.

        Returns:
            ``True`` if the queue drained in time.
        """
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._items or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout_seconds: float = 10.0) -> bool:
        """Flush within ``timeout_seconds``, then stop the thread. Idempotent.

        Batches still queued after the timeout are dropped and counted as
        ``shutdown``.

        Returns:
            ``True`` if everything was delivered or dropped for a known reason
            before the timeout.
        """
        drained = self.flush(timeout_seconds)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._abort.set()
        self._thread.join(timeout=max(1.0, timeout_seconds))
        with self._cond:
            if self._queued_batches:
                self._dropped[DropReason.SHUTDOWN] += self._queued_batches
            self._items.clear()
            self._queued_batches = 0
        self._transport.close()
        return drained

    # -- counters --------------------------------------------------------------------------

    @property
    def dropped_batches(self) -> dict[str, int]:
        """Batches dropped so far, by reason (a copy)."""
        with self._cond:
            return dict(self._dropped)

    @property
    def sent_batches(self) -> int:
        """Batches the transport accepted."""
        return self._sent_batches

    @property
    def sent_steps(self) -> int:
        """Steps in the batches the transport accepted."""
        return self._sent_steps

    # -- sender thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                if isinstance(item, StepBatch):
                    self._queued_batches -= 1
                self._busy = True
            try:
                self._deliver(item)
            except _GiveUpError as exc:
                if isinstance(item, StepBatch):
                    with self._cond:
                        self._dropped[exc.reason] += 1
            except Exception:  # a bug must never kill the thread silently
                log.exception("gradwatch: unexpected error in the sender thread")
                if isinstance(item, StepBatch):
                    with self._cond:
                        self._dropped[DropReason.REJECTED] += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, item: StepBatch | _Status) -> None:
        if not self._run_created:
            self._with_retry(lambda: self._transport.create_run(self._run))
            self._run_created = True
        if isinstance(item, _Status):
            self._with_retry(lambda: self._transport.set_status(self._run.run_id, item.status))
            return
        wire = item.to_wire(self.dropped_batches)
        self._with_retry(lambda: self._transport.send_batch(self._run.run_id, wire))
        self._sent_batches += 1
        self._sent_steps += len(item)

    def _with_retry(self, call: Callable[[], None]) -> None:
        start = self._clock()
        attempt = 0
        while True:
            try:
                call()
                return
            except RejectedError as exc:
                if exc.status_code not in self._logged_rejections:
                    self._logged_rejections.add(exc.status_code)
                    log.error("gradwatch: server rejected a request, not retrying: %s", exc)
                raise _GiveUpError(DropReason.REJECTED) from exc
            except RetryableError as exc:
                wait = exc.retry_after_seconds
                if wait is None:
                    wait = self._retry.backoff_seconds(attempt, self._rng)
                attempt += 1
                if self._clock() - start + wait > self._retry.deadline_seconds:
                    log.warning("gradwatch: giving up after %d attempts: %s", attempt, exc)
                    raise _GiveUpError(DropReason.SERVER_UNAVAILABLE) from exc
                log.debug("gradwatch: retrying in %.2fs: %s", wait, exc)
                if self._abort.wait(wait):
                    raise _GiveUpError(DropReason.SHUTDOWN) from exc
