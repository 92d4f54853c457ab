"""SpoolBacklog: the sender thread's side of the server and of the on-disk backlog.

It creates the run, sends a batch and counts what was delivered or dropped; and a
batch the sender cannot deliver before the retry deadline (or at close) goes
to the :class:`~gradwatch.agent.spool.Spool`, and so does every later batch
while the spool holds anything, so step order is kept. The sender thread then
replays the spool, oldest step first, one attempt at a time with backoff,
until it is empty; a status change waits behind the spooled batches
(``pending_status``, kept in the spool's state file with the drop counts).

:class:`SpoolBacklog` is the half of :class:`~gradwatch.agent.sender.Sender`
that does this; it shares the sender's lock and counters and runs on the
sender thread (and in ``close``). Never imports TensorFlow.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from dataclasses import dataclass

from .clock import Clock
from .delivery_log import DeliveryLog
from .records import OutgoingBatch, StepBatch, announced_incidents, as_wire, with_report
from .spool import Spool, SpoolState
from .transport import (
    RejectedError,
    RetryableError,
    RetryPolicy,
    RunInfo,
    RunRejectedError,
    Transport,
)

__all__ = ["DropReason", "SpoolBacklog", "Status"]

log = logging.getLogger("gradwatch.agent")


class DropReason:
    """Why a batch was not delivered (the ``reason`` label of drop counters)."""

    QUEUE_FULL = "queue_full"
    """The in-memory queue was full when the training thread submitted it."""
    SERVER_UNAVAILABLE = "server_unavailable"
    """Retried until the deadline, and there is no spool to keep it."""
    REJECTED = "rejected"
    """The server refused it (4xx other than 429); retrying cannot help."""
    SHUTDOWN = "shutdown"
    """Still queued when the sender closed, and there is no spool to keep it."""
    SPOOL_FULL = "spool_full"
    """Deleted from the spool, oldest first, to keep it under its size cap."""
    SPOOL_ERROR = "spool_error"
    """Could not be written to, or read back from, the spool."""


@dataclass(frozen=True, slots=True)
class Status:
    """A queued run status change (``running``/``finished``/``failed``)."""

    status: str


class SpoolBacklog:
    """Mixin of :class:`~gradwatch.agent.sender.Sender`: spool undelivered items, replay them.

    Uses the sender's lock (``_cond``) for the shared counters and the replay
    schedule; file I/O happens outside it. Sender-thread methods, except
    :meth:`_keep_undelivered` and :meth:`_finish_spool`, which ``close`` calls
    once the thread has stopped. They block on local disk I/O and, when
    replaying, on one network request.
    """

    _cond: threading.Condition
    _spool: Spool | None
    _run: RunInfo
    _transport: Transport
    _retry: RetryPolicy
    _rng: random.Random
    _clock: Clock
    _dropped: Counter[str]
    _pending_status: str | None
    _replay_at: float | None
    _replay_attempt: int
    _spooled_total: int
    _state_saved: bool
    _spool_error_logged: bool
    _delivery_log: DeliveryLog

    _run_created: bool
    _sent_batches: int
    _sent_steps: int

    # -- the server ------------------------------------------------------------------------

    def _ensure_run(self) -> None:
        """Create the run once. Raises :class:`RunRejectedError` when the server refuses it."""
        if self._run_created:
            return
        try:
            self._transport.create_run(self._run)
        except RejectedError as exc:
            self._delivery_log.run_refused(exc)
            raise RunRejectedError(str(exc), exc.status_code) from exc
        self._run_created = True
        self._delivery_log.run_created()

    def _send(self, batch: OutgoingBatch) -> None:
        """One attempt at one batch, with the drop counts so far.

        A server older than incident announcements refuses a batch carrying them (422 naming
        ``incidents``): the batch is sent again without them, so no step is lost for it, and
        the user is told once where the bundle stays."""
        with self._cond:
            drops = dict(self._dropped)
        body = with_report(batch, dropped_batches=drops) if drops else batch
        try:
            self._transport.send_batch(self._run.run_id, body)
        except RejectedError as exc:
            announced = announced_incidents(body) if exc.status_code == 422 else ()
            if not announced or "incidents" not in str(exc):
                raise
            paths = ", ".join(str(item.get("path")) for item in announced)
            log.warning(
                "gradwatch: the server does not take incident announcements (an older gradwatch "
                "server?); the bundle stays at %s: upgrade the server to see it there",
                paths,
            )
            self._transport.send_batch(self._run.run_id, with_report(body, without_incidents=True))

    def _delivered(self, steps: int) -> None:
        with self._cond:
            self._sent_batches += 1
            self._sent_steps += steps

    def _count(self, reason: str, n: int = 1) -> None:
        with self._cond:
            self._dropped[reason] += n

    # -- replay ----------------------------------------------------------------------------

    def _resume_spool(self) -> None:
        """At start: take over what an earlier process left in the spool (drop counts, the
        pending status, batches), and replay it first. Blocks on reading the state file."""
        spool = self._spool
        if spool is None:
            return
        state = spool.load_state()
        if state is not None:
            self._dropped.update(state.dropped_batches)
            self._pending_status = state.status
        if len(spool) or self._pending_status is not None:
            log.info(
                "gradwatch: %d batches of run %s left in %s; sending them first",
                len(spool),
                self._run.run_id,
                spool.directory,
            )
            self._replay_at = self._clock.monotonic()

    def _replay_one(self) -> None:
        """One attempt at the oldest spooled batch, or at the pending status when none is left."""
        spool = self._spool
        assert spool is not None
        found = spool.peek()
        try:
            self._ensure_run()
            if found is None:
                with self._cond:
                    status = self._pending_status
                if status is not None:
                    self._transport.set_status(self._run.run_id, status)
                with self._cond:
                    if self._pending_status == status:
                        self._pending_status = None
                    self._end_backlog_locked()
                self._save_state()
                return
            entry, wire = found
            if wire is None:
                log.error("gradwatch: unreadable spool file %s deleted", entry.filename)
                spool.remove(entry)
                self._count(DropReason.SPOOL_ERROR)
                self._schedule_replay(0.0)
                return
            self._send(wire)
        except RetryableError as exc:
            log.debug("gradwatch: server still unavailable: %s", exc)
            self._schedule_replay(exc.retry_after_seconds)
            return
        except RunRejectedError as exc:  # wrong URL or token: keep everything, try again later
            log.debug("gradwatch: the server still refuses the run: %s", exc)
            self._schedule_replay(None)
            return
        except RejectedError as exc:
            self._delivery_log.rejected(exc)
            if found is None:  # the status was rejected: nothing more to do
                with self._cond:
                    self._pending_status = None
                    self._end_backlog_locked()
                return
            spool.remove(found[0])
            self._count(DropReason.REJECTED)
            self._schedule_replay(0.0)
            return
        spool.remove(entry)
        self._delivered(len(wire["step"]))
        with self._cond:
            self._replay_attempt = 0
        self._schedule_replay(0.0)

    def _end_backlog_locked(self) -> None:
        spool = self._spool
        if (spool is None or not len(spool)) and self._pending_status is None:
            self._replay_at = None
            self._replay_attempt = 0

    def _schedule_replay(self, wait_seconds: float | None) -> None:
        """Set the next replay attempt: now + ``wait_seconds``, or + backoff when ``None``."""
        with self._cond:
            if wait_seconds is None:
                wait_seconds = self._retry.backoff_seconds(self._replay_attempt, self._rng)
                self._replay_attempt += 1
            self._replay_at = self._clock.monotonic() + wait_seconds
            if wait_seconds == 0.0:
                self._end_backlog_locked()

    # -- spooling -----------------------------------------------------------------------------

    def _to_spool(self, batch: OutgoingBatch, reason_without_spool: str) -> None:
        """Write a batch to the spool (as its JSON wire dict) and start (or continue)
        replaying; count it if impossible."""
        spool = self._spool
        if spool is None:
            self._count(reason_without_spool)
            return
        try:
            if not self._state_saved:
                self._save_state()  # run info first, so a leftover spool can always be uploaded
            evicted = spool.put(as_wire(batch))
        except OSError as exc:
            self._spool_failed(exc)
            self._count(DropReason.SPOOL_ERROR)
            return
        with self._cond:
            self._spooled_total += 1
            if evicted:
                self._dropped[DropReason.SPOOL_FULL] += len(evicted)
            if self._replay_at is None:
                self._replay_at = self._clock.monotonic() + self._retry.backoff_seconds(
                    self._replay_attempt, self._rng
                )
                self._replay_attempt += 1
        if evicted:
            log.warning(
                "gradwatch: spool over its cap of %d bytes; deleted the %d oldest batches",
                spool.max_bytes,
                len(evicted),
            )
            self._save_state()

    def _spool_status(self, status: str) -> None:
        with self._cond:
            if self._spool is None:
                return
            self._pending_status = status
            if self._replay_at is None:
                self._replay_at = self._clock.monotonic()
        self._save_state()

    def _save_state(self) -> None:
        spool = self._spool
        if spool is None:
            return
        with self._cond:
            state = SpoolState(self._run, self._pending_status, dict(self._dropped))
        try:
            spool.save_state(state)
        except OSError as exc:
            self._spool_failed(exc)
        else:
            self._state_saved = True

    def _spool_failed(self, exc: OSError) -> None:
        if not self._spool_error_logged:
            self._spool_error_logged = True
            log.error("gradwatch: cannot write to the spool, batches will be lost: %s", exc)

    def _keep_undelivered(self, items: list[StepBatch | Status]) -> None:
        """At close: spool what is left (or count it as ``shutdown``)."""
        for item in items:
            if isinstance(item, Status):
                self._spool_status(item.status)
            else:
                try:
                    wire = item.to_wire()
                except Exception:
                    log.exception("gradwatch: could not encode a batch at close")
                    self._count(DropReason.SHUTDOWN)
                    continue
                self._to_spool(wire, DropReason.SHUTDOWN)

    def _finish_spool(self) -> None:
        spool = self._spool
        if spool is None:
            return
        with self._cond:
            empty = not len(spool) and self._pending_status is None
        if empty:
            spool.discard_if_empty()
            return
        self._save_state()
        log.warning(
            "gradwatch: %d batches of run %s were not delivered and wait in %s; a monitor with "
            "run_id=%r sends them, or run: gradwatch upload %s --server URL",
            len(spool),
            self._run.run_id,
            spool.directory,
            self._run.run_id,
            spool.directory,
        )
