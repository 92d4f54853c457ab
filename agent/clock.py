"""Clock: the time source of the sender thread (retry deadlines, backoff, replay schedule).

Injectable so tests drive retries with a fake clock instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Time for the sender thread: its retry deadlines, backoff and replay schedule."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def wait(self, condition: threading.Condition, timeout_seconds: float | None) -> None:
        """Wait on ``condition`` (held by the caller) until notified or the timeout passes.

        ``None`` waits until notified. May return early (callers re-check).
        """
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Condition.wait``."""

    def monotonic(self) -> float:
        """Seconds on ``time.monotonic``."""
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout_seconds: float | None) -> None:
        """Block on ``condition`` up to ``timeout_seconds``."""
        condition.wait(timeout_seconds)
