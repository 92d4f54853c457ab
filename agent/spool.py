"""On-disk spool for batches the server has not acknowledged.

While the server is unreachable or failing, the sender writes each batch here
instead of holding it in memory, and replays the spool oldest step first once
the server answers again. The spool outlives the process: a new monitor for
the same run id opens the same directory and sends what is left, and
``gradwatch upload`` (:mod:`gradwatch.agent.upload`) sends a leftover spool by hand.

Layout of one run's spool, ``<root>/<run_id>/``::

    state.json                             run info, pending status, drop counts
    <first step, 20 digits>-<batch_id>.json.gz   one wire batch (gzip JSON)

Files are written to a temporary name and renamed into place, so a process
killed mid-write leaves no partial batch (a killed *machine* may: the spool
does not ``fsync``). Over the size cap the batches with the oldest steps are
deleted, and the caller counts them as dropped.
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from .transport import RunInfo

__all__ = [
    "Spool",
    "SpoolState",
    "SpooledBatch",
    "default_spool_dir",
    "is_spool_directory",
]

log = logging.getLogger("gradwatch.agent")

_BATCH_RE = re.compile(r"^(\d{1,20})-([0-9a-fA-F-]{1,64})\.json\.gz$")
_STATE = "state.json"


def default_spool_dir() -> Path:
    """The default spool root: ``<user cache dir>/gradwatch/spool`` (from ``platformdirs``)."""
    return Path(platformdirs.user_cache_dir("gradwatch")) / "spool"


@dataclass(frozen=True, slots=True)
class SpoolState:
    """What a spool remembers besides its batches.

    Attributes:
        run: The run, so a leftover spool can create it on a server.
        status: A run status (``finished``/``failed``) not yet delivered, if any.
        dropped_batches: The agent's cumulative dropped-batch counts, by reason.
    """

    run: RunInfo
    status: str | None = None
    dropped_batches: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of the state."""
        return {
            "run": self.run.to_wire(),
            "status": self.status,
            "dropped_batches": dict(self.dropped_batches),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpoolState:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: The dict is not a spool state.
        """
        try:
            drops = {str(k): int(v) for k, v in dict(data.get("dropped_batches") or {}).items()}
            status = data.get("status")
            return cls(
                run=RunInfo.from_wire(data["run"]),
                status=None if status is None else str(status),
                dropped_batches=drops,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a spool state: {exc}") from exc


@dataclass(frozen=True, slots=True, order=True)
class SpooledBatch:
    """One batch in the spool, ordered by first step.

    Attributes:
        first_step: First step of the batch.
        batch_id: The batch's id.
        size_bytes: Size of its file on disk.
    """

    first_step: int
    batch_id: str
    size_bytes: int = field(compare=False)

    @property
    def filename(self) -> str:
        """Name of its file in the run's spool directory."""
        return f"{self.first_step:020d}-{self.batch_id}.json.gz"


class Spool:
    """A run's on-disk queue of wire batches, oldest step first, capped in bytes.

    Opening a spool reads the names of the files already there (a leftover
    from an earlier process) and creates nothing; the run's directory is made
    on the first write.

    Thread-safe: every method may be called from any thread; file I/O happens
    outside the internal lock, so :meth:`__len__` and :attr:`size_bytes` never
    wait on the disk. Every method blocks on local disk I/O only.

    Args:
        root: Spool root; the run's files go to ``root/<run_id>``.
        run_id: The run.
        max_bytes: Cap on the total size of the batch files (>= 0).
    """

    def __init__(self, root: Path, run_id: str, max_bytes: int) -> None:
        self._directory = Path(root) / run_id
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: list[SpooledBatch] = []
        self._bytes = 0
        self._scan()

    @property
    def directory(self) -> Path:
        """The run's spool directory (may not exist yet)."""
        return self._directory

    @property
    def max_bytes(self) -> int:
        """The size cap, bytes."""
        return self._max_bytes

    @property
    def size_bytes(self) -> int:
        """Total size of the spooled batch files, bytes."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def entries(self) -> list[SpooledBatch]:
        """The spooled batches, oldest step first (a copy)."""
        with self._lock:
            return list(self._index)

    def reset_after_fork(self) -> None:
        """Give a forked child its own lock (the parent's may have been held)."""
        self._lock = threading.Lock()

    def put(self, wire: Mapping[str, Any]) -> list[SpooledBatch]:
        """Write one wire batch; then delete the oldest batches while over the cap.

        A batch already spooled (same first step and id) is replaced. The new
        batch itself is deleted at once when it is the oldest and does not fit.

        Returns:
            The batches deleted to respect the cap (to be counted as dropped).

        Raises:
            OSError: The file could not be written.
        """
        payload = gzip.compress(
            json.dumps(wire, separators=(",", ":"), allow_nan=False).encode(), compresslevel=1
        )
        entry = SpooledBatch(int(wire["step"][0]), str(wire["batch_id"]), len(payload))
        self._atomic_write(entry.filename, payload)
        evicted: list[SpooledBatch] = []
        with self._lock:
            self._discard_locked(entry)
            bisect.insort(self._index, entry)
            self._bytes += entry.size_bytes
            while self._index and self._bytes > self._max_bytes:
                oldest = self._index.pop(0)
                self._bytes -= oldest.size_bytes
                evicted.append(oldest)
        for old in evicted:
            self._unlink(old.filename)
        return evicted

    def peek(self) -> tuple[SpooledBatch, dict[str, Any] | None] | None:
        """The oldest batch and its wire dict, or ``None`` when the spool is empty.

        A file that cannot be read or decoded comes back with ``None`` as its
        wire dict (remove it and count it); a file deleted behind the spool's
        back (another process sent it) is skipped.
        """
        while True:
            with self._lock:
                if not self._index:
                    return None
                entry = self._index[0]
            try:
                wire = _load(self._directory / entry.filename)
            except FileNotFoundError:
                self.remove(entry)
                continue
            except (OSError, EOFError, ValueError):
                return entry, None
            if not isinstance(wire, dict) or wire.get("batch_id") != entry.batch_id:
                return entry, None
            return entry, wire

    def read(self, entry: SpooledBatch) -> dict[str, Any] | None:
        """The wire dict of ``entry``, or ``None`` when its file is gone or cannot be decoded.

        Blocks on local disk I/O; safe from any thread.
        """
        try:
            wire = _load(self._directory / entry.filename)
        except (OSError, EOFError, ValueError):
            return None
        return wire if isinstance(wire, dict) else None

    def remove(self, entry: SpooledBatch) -> None:
        """Delete a batch (delivered, rejected or unreadable). Missing files are ignored."""
        with self._lock:
            found = self._discard_locked(entry)
        if found:
            self._unlink(entry.filename)

    def load_state(self) -> SpoolState | None:
        """The stored state, or ``None`` if there is none or it does not parse."""
        try:
            return SpoolState.from_json(json.loads((self._directory / _STATE).read_text("utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning(
                "gradwatch: ignoring unreadable spool state in %s: %s", self._directory, exc
            )
            return None

    def save_state(self, state: SpoolState) -> None:
        """Store the state (atomically).

        Raises:
            OSError: The file could not be written.
        """
        data = json.dumps(state.to_json(), separators=(",", ":"), allow_nan=False).encode()
        self._atomic_write(_STATE, data)

    def discard_if_empty(self) -> bool:
        """Delete the run's directory when it holds no batch. Returns whether it did."""
        with self._lock:
            if self._index:
                return False
        with contextlib.suppress(OSError):
            (self._directory / _STATE).unlink(missing_ok=True)
            self._directory.rmdir()
        return not self._directory.exists()

    # -- internals -------------------------------------------------------------------------

    def _scan(self) -> None:
        try:
            names = os.listdir(self._directory)
        except OSError:
            return
        for name in names:
            match = _BATCH_RE.match(name)
            if match is None:
                continue
            try:
                size = (self._directory / name).stat().st_size
            except OSError:
                continue
            entry = SpooledBatch(int(match.group(1)), match.group(2), size)
            if entry.filename != name:  # not written by this module (e.g. unpadded step)
                continue
            self._index.append(entry)
            self._bytes += size
        self._index.sort()

    def _discard_locked(self, entry: SpooledBatch) -> bool:
        position = bisect.bisect_left(self._index, entry)
        if position < len(self._index) and self._index[position] == entry:
            self._bytes -= self._index.pop(position).size_bytes
            return True
        return False

    def _atomic_write(self, name: str, payload: bytes) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        temporary = self._directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            temporary.write_bytes(payload)
            os.replace(temporary, self._directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self._directory / name).unlink()


def is_spool_directory(path: Path) -> bool:
    """Whether ``path`` is one run's spool directory (it holds the run's state file)."""
    return path.is_dir() and (path / _STATE).is_file()


def _load(path: Path) -> Any:
    """The decoded JSON of one gzip batch file.

    Raises:
        OSError, EOFError, ValueError: The file is gone, or is not gzip JSON.
    """
    return json.loads(gzip.decompress(path.read_bytes()))
