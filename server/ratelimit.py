"""Token-bucket rate limits, kept in one process or shared by a server's worker processes.

A :class:`RateLimiter` allows ``rate`` events per second per key with bursts of ``burst``. Its
buckets live in a :class:`BucketStore`:

- :class:`MemoryBuckets` (the default): a dict in this process.
- :class:`FileBuckets`: a fixed table in a memory-mapped file, locked with ``flock``, so every
  worker of ``gradwatch server --workers N`` takes from the same buckets and the configured
  rate holds for the server as a whole, not N times over. The table has :data:`FILE_SLOTS`
  slots found by hashing the key (eight probes); when all eight are taken by other keys the
  longest-idle one is reused, which refills that key's bucket early (only under floods of
  distinct keys). POSIX only (``fcntl``).

Time is ``time.monotonic()`` (CLOCK_MONOTONIC, the same in every process of a machine) or an
injected clock, so tests drive it without sleeping. Every call is thread-safe and blocks only
on a lock (plus ``flock`` for the file store), for microseconds.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from .errors import RateLimitedError

__all__ = [
    "FILE_SLOTS",
    "BucketStore",
    "FileBuckets",
    "MemoryBuckets",
    "RateLimiter",
]

FILE_SLOTS: Final = 16_384
"""Buckets a :class:`FileBuckets` table holds."""

_SLOT = struct.Struct("<Qdd")  # key hash (0: free), tokens, time of last update
_PROBES = 8


class BucketStore(Protocol):
    """Where token buckets live: one process (:class:`MemoryBuckets`) or several."""

    def take(self, key: str, rate: float, burst: float, now: float, *, consume: bool) -> float:
        """Refill ``key``'s bucket to ``now`` and return its tokens before taking any.

        A bucket seen for the first time is full (``burst``). With ``consume``, one token is
        taken when at least one is there. Thread-safe.
        """
        ...


def _refill(stored: tuple[float, float] | None, rate: float, burst: float, now: float) -> float:
    if stored is None:
        return burst
    tokens, since = stored
    return min(burst, tokens + max(0.0, now - since) * rate)


class MemoryBuckets:
    """Buckets in a dict of this process. Thread-safe (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, rate: float, burst: float, now: float, *, consume: bool) -> float:
        """See :meth:`BucketStore.take`."""
        with self._lock:
            tokens = _refill(self._buckets.get(key), rate, burst, now)
            self._buckets[key] = (tokens - 1.0 if consume and tokens >= 1.0 else tokens, now)
            return tokens


class FileBuckets:
    """Buckets in a memory-mapped file shared by processes (``flock`` around each update).

    Create the file once with :meth:`create` before starting the processes; each process
    then opens it with the constructor. Thread-safe (a lock, then ``flock``).

    Args:
        path: A file made by :meth:`create`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(self._fd, FILE_SLOTS * _SLOT.size)
        except (OSError, ValueError):
            os.close(self._fd)
            raise

    @staticmethod
    def create(path: str | os.PathLike[str]) -> Path:
        """Create (or empty) the shared table at ``path``; blocks on one small write."""
        target = Path(path)
        with target.open("wb") as file:
            file.truncate(FILE_SLOTS * _SLOT.size)
        return target

    def take(self, key: str, rate: float, burst: float, now: float, *, consume: bool) -> float:
        """See :meth:`BucketStore.take`."""
        import fcntl  # POSIX only; imported here so importing this module works everywhere

        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        digest = digest or 1  # 0 marks a free slot
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                offset, stored = self._find(digest)
                tokens = _refill(stored, rate, burst, now)
                left = tokens - 1.0 if consume and tokens >= 1.0 else tokens
                _SLOT.pack_into(self._map, offset, digest, left, now)
                return tokens
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _find(self, digest: int) -> tuple[int, tuple[float, float] | None]:
        """The slot of ``digest`` (and its bucket), a free slot, or the longest-idle one."""
        oldest_offset, oldest_since = -1, math.inf
        for probe in range(_PROBES):
            offset = ((digest + probe) % FILE_SLOTS) * _SLOT.size
            owner, tokens, since = _SLOT.unpack_from(self._map, offset)
            if owner == digest:
                return offset, (tokens, since)
            if owner == 0:
                return offset, None
            if since < oldest_since:
                oldest_offset, oldest_since = offset, since
        return oldest_offset, None

    def close(self) -> None:
        """Unmap and close the file (the table stays for the other processes)."""
        self._map.close()
        os.close(self._fd)


class RateLimiter:
    """Token buckets, one per key: ``rate`` events per second, bursts of ``burst``.

    Thread-safe; never blocks beyond its store's lock.

    Args:
        rate: Sustained events per second; 0 disables the limit.
        burst: Events allowed at once (bucket capacity), ≥ 1.
        clock: Monotonic time in seconds (shared by processes with a :class:`FileBuckets`).
        buckets: Where the buckets live; a fresh :class:`MemoryBuckets` by default.
        namespace: Prefix of this limiter's keys, so limiters can share one store.
        what: What is limited, for error messages ("requests per second per token").
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        buckets: BucketStore | None = None,
        namespace: str = "",
        what: str = "requests per second per token",
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: BucketStore = MemoryBuckets() if buckets is None else buckets
        self._namespace = namespace
        self._what = what

    def acquire(self, key: str) -> None:
        """Take one event from ``key``'s bucket.

        Raises:
            RateLimitedError: The bucket is empty; ``retry_after_seconds`` says when it
                holds one again.
        """
        self._take(key, consume=True)

    def check(self, key: str) -> None:
        """Raise like :meth:`acquire` when ``key``'s bucket is empty, without taking from it."""
        self._take(key, consume=False)

    def _take(self, key: str, *, consume: bool) -> None:
        if self._rate <= 0:
            return
        tokens = self._buckets.take(
            self._namespace + key, self._rate, self._burst, self._clock(), consume=consume
        )
        if tokens >= 1.0:
            return
        wait = (1.0 - tokens) / self._rate
        raise RateLimitedError(
            f"rate limit: at most {self._rate:g} {self._what} "
            f"(bursts of {self._burst:g}); retry in {wait:.2f} s",
            retry_after_seconds=max(1, math.ceil(wait)),
        )
