"""What ingest remembers of a run between its batches: the series' running summaries and the
detector state, so a batch does not read back what the previous batch of the run just wrote.

Reading them cost ~5 ms of a 500-layer batch's ~40 ms of CPU (a thousand summary rows turned
into arrays, the detector state's row decompressed and parsed; ``python -m
bench.ingest_memo``). The database stays the truth: a memo is used only when the run's row,
read under the run's lock at the start of the batch, shows the very state the memo was taken
at (:data:`RunVersion`: the run's ``created_at``, its ``num_steps``, which every stored batch
raises, and its ``updated_at``, the time of its last batch or status change), so a batch
stored by another worker or process, a rolled-back transaction, a deleted and re-created run or
a restored backup all make the memo miss and the batch read the database as before. A memo is
published only after its transaction commits.

Thread-safe; nothing here blocks on I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from ..detect.state import DetectorState
from ..store.models import Run
from ..store.summary import RunSummaries

__all__ = ["RunMemo", "RunMemos", "RunVersion", "TransactionMemos", "run_version"]

RunVersion = tuple[datetime, int, datetime]
"""A run's ``(created_at, num_steps, updated_at)``: which committed state of the run a memo
describes."""

_CAPACITY = 64
"""Runs remembered per process (least recently ingested dropped first): ~0.2 MB each at 500
layers, so at most ~13 MB; more live runs than this only cost their reads again."""


def run_version(run: Run) -> RunVersion:
    """The version of a run's stored series and detector state (read under its lock)."""
    return run.created_at, run.num_steps, run.updated_at


@dataclass(frozen=True, slots=True)
class RunMemo:
    """A run's series summaries and detector state as they stand at ``version``.

    Both are treated as immutable: ingest builds new ones for the next version.
    """

    version: RunVersion
    summaries: RunSummaries
    detector: DetectorState | None
    """None: the run has no (readable) detector state, as the database would say."""


class RunMemos:
    """The committed memos of recently ingested runs, per database (a bounded LRU).

    Thread-safe. Args: capacity: most runs kept.
    """

    def __init__(self, capacity: int = _CAPACITY) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._memos: OrderedDict[tuple[str, str], RunMemo] = OrderedDict()

    def get(self, database: str, run_id: str, version: RunVersion) -> RunMemo | None:
        """The memo of a run if it describes ``version``, else None."""
        key = (database, run_id)
        with self._lock:
            memo = self._memos.get(key)
            if memo is None:
                return None
            self._memos.move_to_end(key)
        return memo if memo.version == version else None

    def put(self, database: str, run_id: str, memo: RunMemo) -> None:
        """Remember a memo whose transaction committed (replaces the run's older one)."""
        key = (database, run_id)
        with self._lock:
            self._memos[key] = memo
            self._memos.move_to_end(key)
            while len(self._memos) > self._capacity:
                self._memos.popitem(last=False)

    def clear(self) -> None:
        """Forget every memo (the next batch of each run reads the database)."""
        with self._lock:
            self._memos.clear()


MEMOS = RunMemos()
"""This process's memos, shared by every session and engine (keyed by database URL)."""


@dataclass(slots=True)
class TransactionMemos:
    """The memos one ingest transaction builds; :meth:`publish` them once it commits.

    Not thread-safe: belongs to the transaction's thread.
    """

    database: str
    memos: RunMemos = field(default_factory=lambda: MEMOS)
    _pending: dict[str, RunMemo] = field(default_factory=dict)

    @classmethod
    def of(cls, session: Session, memos: RunMemos | None = None) -> TransactionMemos:
        """Memos for a transaction of ``session`` (its database named by its URL)."""
        database = session.get_bind().engine.url.render_as_string(hide_password=True)
        return cls(database) if memos is None else cls(database, memos)

    def get(self, run_id: str, version: RunVersion) -> RunMemo | None:
        """The run's memo at ``version``: this transaction's own, else a committed one."""
        pending = self._pending.get(run_id)
        if pending is not None and pending.version == version:
            return pending
        return self.memos.get(self.database, run_id, version)

    def stage(self, run_id: str, memo: RunMemo) -> None:
        """Keep a memo of the state this transaction wrote (not visible to others yet)."""
        self._pending[run_id] = memo

    def publish(self) -> None:
        """Make the staged memos visible; call only after the transaction committed."""
        for run_id, memo in self._pending.items():
            self.memos.put(self.database, run_id, memo)
        self._pending.clear()
