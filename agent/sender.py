"""Background delivery of batches: a bounded queue, one daemon thread, an on-disk spool.

The training thread only ever calls :meth:`Sender.submit`, which never waits on
the network or the disk: when the in-memory queue is full (in batches or in
bytes) the batch is dropped and counted. The sender thread serialises batches
and delivers them through a :class:`~gradwatch.agent.transport.Transport`:

* Transient failures (connection errors, 5xx, 429) are retried with
  exponential backoff and full jitter, honouring the server's ``Retry-After``,
  until the retry deadline (:func:`~gradwatch.agent.transport.call_with_retry`).
* Past the deadline the batch goes to the :class:`~gradwatch.agent.spool.Spool`
  (when there is one), and so does every later batch while the spool holds
  anything, so step order is kept. The thread replays the spool, oldest step
  first, one attempt at a time with backoff, until it is empty (that half is
  :class:`~gradwatch.agent.backlog.SpoolBacklog`).
* A rejection (other 4xx) of a batch is never retried; the batch is counted as
  ``rejected``. A rejection of the run itself (a wrong ``server`` path or token) is
  a configuration error: every batch goes to the spool, to wait for the right
  server. What the user is told, and when: :mod:`gradwatch.agent.delivery_log`.
* At :meth:`Sender.close` whatever was not delivered before the timeout is
  written to the spool (or, without one, counted as ``shutdown``).

Drop counts are cumulative and travel with every batch sent (``dropped_batches``
on the wire); with a spool they are also kept on disk, so a restarted process
continues them. No exception raised by a transport or the spool ever reaches
the caller.

Process events (:mod:`gradwatch.agent.lifecycle`): every sender is closed at
interpreter exit (the registry holds only a weak reference), and after
``os.fork`` the child's senders drop the parent's queue, get fresh locks and
connections, and start their thread on first use.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .backlog import DropReason, SpoolBacklog, Status
from .clock import Clock, SystemClock
from .delivery_log import DeliveryLog
from .lifecycle import close_at_exit, reset_after_fork
from .records import StepBatch
from .spool import Spool
from .transport import (
    RejectedError,
    RetryableError,
    RetryPolicy,
    RunInfo,
    RunRejectedError,
    Transport,
    call_with_retry,
)

__all__ = ["DropReason", "Sender"]

log = logging.getLogger("gradwatch.agent")

_JOIN_GRACE_SECONDS = 0.1
"""How long ``close`` waits for the thread to stop once the flush timeout has passed."""


class _ShutdownError(Exception):
    """The sender is closing: stop waiting for a retry."""


# -- the sender ----------------------------------------------------------------------------


class Sender(SpoolBacklog):
    """Delivers a run's batches from a daemon thread, spooling to disk while the server is away.

    Thread-safe: every method may be called from any thread. ``submit``,
    ``set_status`` and the counters never block on I/O (they take a lock held
    only for queue bookkeeping); ``flush``, ``close`` and ``wait_for`` block up
    to their timeout.

    Args:
        transport: Where to deliver; used from the sender thread (and, for the
            last batches, from the thread calling ``close``).
        run: The run to create before the first batch.
        queue_size: Most batches held in memory (>= 1).
        retry: Retry policy for transient failures.
        clock: Time for retries and replay (a fake one in tests); ``flush`` and
            ``close`` timeouts always use real time.
        rng: Source of jitter (injectable for tests).
        spool: Where undelivered batches go; ``None`` drops them instead.
        queue_max_bytes: Most bytes of batch arrays held in memory (>= 1).
        exit_timeout_seconds: Timeout of the ``close`` run at interpreter exit.
    """

    def __init__(
        self,
        transport: Transport,
        run: RunInfo,
        queue_size: int = 1000,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        spool: Spool | None = None,
        queue_max_bytes: int = 64 * 2**20,
        exit_timeout_seconds: float = 10.0,
    ) -> None:
        self._transport = transport
        self._run = run
        self._queue_size = queue_size
        self._queue_max_bytes = queue_max_bytes
        self._retry = retry or RetryPolicy()
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._spool = spool
        self._exit_timeout_seconds = exit_timeout_seconds
        self._items: deque[StepBatch | Status] = deque()
        self._queued_batches = 0
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._busy = False
        self._in_flight: StepBatch | None = None
        self._closing = False
        self._closed = False
        self._run_created = False
        self._dropped: Counter[str] = Counter()
        self._accepted_batches = 0
        self._accepted_steps = 0
        self._sent_batches = 0
        self._sent_steps = 0
        self._spooled_total = 0
        self._delivery_log = DeliveryLog(
            run.run_id, None if spool is None else spool.directory, self._retry.deadline_seconds
        )
        self._spool_error_logged = False
        self._state_saved = False
        self._pending_status: str | None = None
        self._replay_attempt = 0
        self._replay_at: float | None = None
        self._resume_spool()
        self._drops_at_start = sum(self._dropped.values())
        self._thread: threading.Thread | None = None
        self._start_thread()
        close_at_exit(self._close_at_exit)
        reset_after_fork(self._reset_after_fork)

    # -- training-thread API ---------------------------------------------------------------

    def submit(self, batch: StepBatch) -> bool:
        """Queue a batch for delivery without waiting (never blocks on I/O).

        Returns:
            ``False`` if the queue was full (in batches or bytes) or the sender
            closed (the batch is dropped and counted), else ``True``.
        """
        size = batch.nbytes
        with self._cond:
            if self._closing:
                self._dropped[DropReason.SHUTDOWN] += 1
                return False
            if (
                self._queued_batches >= self._queue_size
                or self._queued_bytes + size > self._queue_max_bytes
            ):
                self._dropped[DropReason.QUEUE_FULL] += 1
                return False
            self._items.append(batch)
            self._queued_batches += 1
            self._queued_bytes += size
            self._accepted_batches += 1
            self._accepted_steps += len(batch)
            self._start_thread()
            self._cond.notify_all()
            return True

    def add_run_config(self, **fields: Any) -> bool:
        """Add JSON-able ``fields`` to the run's config, if the run is not created yet.

        Never blocks on I/O. Returns:
            ``False`` when the server already has the run (its config is not changed).
        """
        with self._cond:
            if self._run_created or self._state_saved:
                return False
            self._run = dataclasses.replace(self._run, config={**self._run.config, **fields})
            return True

    def set_status(self, status: str) -> None:
        """Queue a run status change (``running``/``finished``/``failed``) after pending batches.

        Never blocks on I/O.
        """
        with self._cond:
            if not self._closing:
                self._items.append(Status(status))
                self._start_thread()
                self._cond.notify_all()

    def flush(self, timeout_seconds: float) -> bool:
        """Block until everything queued so far is delivered, or the timeout passes.

        With a spool, "delivered" includes the batches spooled earlier: a flush
        also asks the thread to try the server again now rather than at the end
        of its current backoff.

        Args:
            timeout_seconds: Longest wait, seconds (real time).

        Returns:
            ``True`` if the queue and the spool are empty.
        """
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            self._start_thread()
            if self._replay_at is not None:
                self._replay_at = self._clock.monotonic()
                self._cond.notify_all()
            while not self._drained_locked():
                remaining = deadline - time.monotonic()
                thread = self._thread
                if remaining <= 0 or thread is None or not thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    def wait_for(self, predicate: Callable[[], bool], timeout_seconds: float) -> bool:
        """Block until ``predicate()`` is true, re-checked whenever the thread finishes an item.

        Args:
            predicate: Called with the sender's lock held; must not call back
                into the sender's blocking methods.
            timeout_seconds: Longest wait, seconds (real time).

        Returns:
            The last value of ``predicate()``.
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout_seconds)

    def close(self, timeout_seconds: float = 10.0) -> bool:
        """Flush within ``timeout_seconds``, then stop the thread. Idempotent; never raises.

        Batches not delivered by then are written to the spool, so a later
        monitor with the same run id (or ``gradwatch upload``) sends them;
        without a spool they are dropped and counted as ``shutdown``. Blocks up
        to about ``timeout_seconds`` (plus local disk writes).

        Returns:
            ``True`` if everything was delivered before the timeout and this
            sender dropped nothing (no rejection, no full queue, no outage
            past the retry deadline without a spool).
        """
        with self._cond:
            if self._closed:
                return self._drained_locked() and not self._lost_locked()
            self._closed = True
        deadline = time.monotonic() + timeout_seconds
        drained = self.flush(timeout_seconds)
        with self._cond:
            self._closing = True
            left = list(self._items)
            self._items.clear()
            self._queued_batches = 0
            self._queued_bytes = 0
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=max(_JOIN_GRACE_SECONDS, deadline - time.monotonic()))
        with self._cond:
            in_flight = self._in_flight if thread is not None and thread.is_alive() else None
        if in_flight is not None:
            left.insert(0, in_flight)  # may still be delivered too: resends are idempotent
        self._keep_undelivered(left)
        self._finish_spool()
        try:
            self._transport.close()
        except Exception:
            log.exception("gradwatch: error while closing the transport")
        with self._cond:
            return drained and not self._lost_locked()

    # -- counters --------------------------------------------------------------------------

    @property
    def dropped_batches(self) -> dict[str, int]:
        """Batches dropped so far, by reason (a copy; cumulative over the run's spool)."""
        with self._cond:
            return dict(self._dropped)

    @property
    def run_rejected(self) -> str | None:
        """The server's refusal to create the run (a configuration error), or ``None``."""
        return self._delivery_log.refused

    @property
    def accepted_batches(self) -> int:
        """Batches :meth:`submit` accepted."""
        return self._accepted_batches

    @property
    def accepted_steps(self) -> int:
        """Steps in the batches :meth:`submit` accepted."""
        return self._accepted_steps

    @property
    def sent_batches(self) -> int:
        """Batches the transport accepted."""
        return self._sent_batches

    @property
    def sent_steps(self) -> int:
        """Steps in the batches the transport accepted."""
        return self._sent_steps

    @property
    def queued_batches(self) -> int:
        """Batches in memory, waiting for the thread (not counting the one in flight)."""
        return self._queued_batches

    @property
    def spooled_batches(self) -> int:
        """Batches in the spool now (0 without a spool)."""
        return len(self._spool) if self._spool is not None else 0

    @property
    def spooled_total(self) -> int:
        """Batches written to the spool since this sender started."""
        return self._spooled_total

    @property
    def spool(self) -> Spool | None:
        """The spool, if any."""
        return self._spool

    @property
    def idle(self) -> bool:
        """Whether the thread has nothing in memory to work on (the spool may hold batches)."""
        with self._cond:
            return not self._items and not self._busy

    # -- sender thread ---------------------------------------------------------------------

    def _start_thread(self) -> None:
        """Start the thread if it is not running (caller holds the lock or is ``__init__``)."""
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._loop, name="gradwatch-sender", daemon=True)
            self._thread.start()

    def _drained_locked(self) -> bool:
        return not self._items and not self._busy and not self._backlog_locked()

    def _backlog_locked(self) -> bool:
        return self._replay_at is not None

    def _lost_locked(self) -> bool:
        """Whether this sender dropped a batch, or the server refused the run."""
        refused = self._delivery_log.refused is not None
        return refused or sum(self._dropped.values()) > self._drops_at_start

    def _loop(self) -> None:
        while True:
            with self._cond:
                item: StepBatch | Status | None = None
                while True:
                    if self._items:
                        item = self._items.popleft()
                        if isinstance(item, StepBatch):
                            self._queued_batches -= 1
                            self._queued_bytes -= item.nbytes
                            self._in_flight = item
                        self._cond.notify_all()  # for wait_for(): the queue changed
                        break
                    if self._closing:
                        return
                    if self._replay_at is not None:
                        wait = self._replay_at - self._clock.monotonic()
                        if wait <= 0:
                            break
                        self._clock.wait(self._cond, wait)
                    else:
                        self._clock.wait(self._cond, None)
                self._busy = True
            try:
                if item is None:
                    self._replay_one()
                else:
                    self._handle(item)
            except Exception:  # a bug must never kill the thread silently
                log.exception("gradwatch: unexpected error in the sender thread")
                if isinstance(item, StepBatch):
                    self._count(DropReason.REJECTED)
                elif item is None:
                    self._schedule_replay(None)
            finally:
                with self._cond:
                    self._busy = False
                    self._in_flight = None
                    self._cond.notify_all()

    def _handle(self, item: StepBatch | Status) -> None:
        with self._cond:
            backlog = self._backlog_locked()
        if isinstance(item, Status):
            if backlog:
                self._spool_status(item.status)
                return
            try:
                self._with_retry(self._ensure_run)
                self._with_retry(lambda: self._transport.set_status(self._run.run_id, item.status))
            except RunRejectedError:
                self._spool_status(item.status)
            except RejectedError:
                return
            except (RetryableError, _ShutdownError):
                self._spool_status(item.status)
            return
        if backlog:
            self._to_spool(item, DropReason.SHUTDOWN)
            return
        try:
            self._with_retry(self._ensure_run)
            self._with_retry(lambda: self._send(item))
        except RunRejectedError:
            self._to_spool(item, DropReason.REJECTED)
            return
        except RejectedError:
            self._count(DropReason.REJECTED)
            return
        except RetryableError:
            self._to_spool(item, DropReason.SERVER_UNAVAILABLE)
            return
        except _ShutdownError:
            self._to_spool(item, DropReason.SHUTDOWN)
            return
        self._delivered(len(item))

    def _with_retry(self, call: Callable[[], None]) -> None:
        def attempt() -> None:
            try:
                call()
            except RetryableError as exc:
                self._delivery_log.unreachable(exc)
                raise
            self._delivery_log.answered()

        try:
            call_with_retry(attempt, self._retry, self._rng, self._clock.monotonic, self._sleep)
        except RunRejectedError:
            raise
        except RejectedError as exc:
            self._delivery_log.rejected(exc)
            raise
        except RetryableError as exc:
            with self._cond:
                closing = self._closing
            if closing:
                raise _ShutdownError from exc
            raise

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` on the sender's clock; ``False`` if the sender started closing."""
        with self._cond:
            end = self._clock.monotonic() + seconds
            while not self._closing:
                remaining = end - self._clock.monotonic()
                if remaining <= 0:
                    return True
                self._clock.wait(self._cond, remaining)
            return False

    # -- process events --------------------------------------------------------------------

    def _close_at_exit(self) -> None:
        self.close(self._exit_timeout_seconds)

    def _reset_after_fork(self) -> None:
        """In a forked child: forget the parent's queue, renew locks and connections."""
        self._cond = threading.Condition()
        self._items = deque()
        self._queued_batches = 0
        self._queued_bytes = 0
        self._busy = False
        self._in_flight = None
        self._thread = None  # started on first use
        self._delivery_log.reset_after_fork()
        if self._spool is not None:
            self._spool.reset_after_fork()
        reset = getattr(self._transport, "reset_after_fork", None)
        if callable(reset):
            reset()
        close_at_exit(self._close_at_exit)
