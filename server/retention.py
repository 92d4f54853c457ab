"""The server's periodic prune (``GRADWATCH_RETENTION_DAYS``): a thread of its own.

Every ``interval_seconds`` the thread deletes the finished or failed runs last active more
than ``retention_days`` ago (:func:`gradwatch.server.store.retention.prune_runs`, in small
transactions, so ingest goes on). A thread rather than an asyncio task: the work is blocking
database I/O, and a thread that waits on an :class:`threading.Event` stops between chunks the
moment the server shuts down. A failed pass (database away) is logged and retried at the next
interval; it never stops the server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .store.db import Database
from .store.retention import PruneReport, prune_runs

__all__ = ["Retainer"]

_log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Retainer:
    """Prunes old finished runs every ``interval_seconds`` in a daemon thread.

    :meth:`start` and :meth:`stop` are called once each, from one thread (the app's
    lifespan); :attr:`passes` and :meth:`wait_for_pass` may be used from any thread.

    Args:
        database: The server's database.
        retention_days: Runs finished or failed and last active longer ago than this many
            days are deleted (> 0).
        interval_seconds: Seconds between the end of one pass and the start of the next; the
            first pass starts at once.
        clock: Current time (timezone-aware); a parameter for tests.
    """

    def __init__(
        self,
        database: Database,
        retention_days: float,
        interval_seconds: float,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if retention_days <= 0 or interval_seconds <= 0:
            raise ValueError("retention_days and interval_seconds must be positive")
        self._database = database
        self._retention = timedelta(days=retention_days)
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._stop = threading.Event()
        self._pass_done = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="gradwatch-retention", daemon=True)
        self.passes = 0
        """Passes completed (successful or failed), for tests and logs."""
        self.last_report: PruneReport | None = None
        """What the last successful pass deleted."""

    def start(self) -> None:
        """Start the thread; returns at once."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop and wait for it: at most the end of the current chunk."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def wait_for_pass(self, passes: int, timeout_seconds: float) -> bool:
        """Block until ``passes`` passes have completed or the timeout ends; return whether
        they have."""
        with self._pass_done:
            return self._pass_done.wait_for(lambda: self.passes >= passes, timeout_seconds)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_pass()
            if self._stop.wait(self._interval_seconds):
                return

    def _run_pass(self) -> None:
        cutoff = self._clock() - self._retention
        try:
            report = prune_runs(
                self._database,
                cutoff,
                wait_for_other_prune=False,  # another worker's pass is doing the same work
                should_stop=self._stop.is_set,
            )
        except Exception:
            _log.exception("retention: prune of runs older than %s failed", cutoff.isoformat())
        else:
            if report is not None:
                self.last_report = report
                if report.run_ids:
                    _log.info(
                        "retention: deleted %d runs last active before %s (%d blocks, %d bytes "
                        "of samples)",
                        len(report.run_ids),
                        cutoff.isoformat(timespec="seconds"),
                        report.rows["blocks"],
                        report.sample_bytes,
                    )
        with self._pass_done:
            self.passes += 1
            self._pass_done.notify_all()
