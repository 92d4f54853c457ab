"""Local mode: runs written to JSON-lines files instead of a server, and their summary.

:class:`JsonlTransport` writes the wire dicts the sender would send to one file
per run; :func:`read_run_file` reads one back (``gradwatch upload`` sends it to
a server later); :class:`SummaryPrinter` prints a run's totals at the end of
training. Never imports TensorFlow.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradwatch.wire import decode_float

from .records import OutgoingBatch, as_wire
from .transport import RetryableError, RunInfo

__all__ = ["JsonlTransport", "LocalSummary", "RunFile", "SummaryPrinter", "read_run_file"]


@dataclass(frozen=True, slots=True)
class LocalSummary:
    """Totals of the batches a :class:`JsonlTransport` wrote for one run.

    Attributes:
        path: The run's file.
        steps: Steps written.
        max_global_norm: Largest global gradient norm (before clipping), ignoring
            NaN; ``None`` when no step had one.
        clipped_steps: Steps whose clip coefficient was below 1.
        skipped_steps: Steps whose update was skipped.
        nonfinite_steps: Steps with a NaN/±Inf gradient value or global norm.
    """

    path: Path
    steps: int = 0
    max_global_norm: float | None = None
    clipped_steps: int = 0
    skipped_steps: int = 0
    nonfinite_steps: int = 0

    def describe(self, run_name: str) -> str:
        """Two human-readable lines for the end of training."""
        norm = "n/a" if self.max_global_norm is None else f"{self.max_global_norm:.4g}"
        return (
            f"gradwatch: run {run_name!r}: {self.steps} steps, max global norm {norm}, "
            f"{self.clipped_steps} clipped, {self.skipped_steps} skipped, "
            f"{self.nonfinite_steps} non-finite\n"
            f"gradwatch: written to {self.path} "
            f"(send it to a server with: gradwatch upload {self.path} --server URL)"
        )

    def add(self, batch: Mapping[str, Any]) -> LocalSummary:
        """This summary plus one wire batch."""
        norms = [_wire_float(v) for v in batch["global_norm"]]
        coefs = [_wire_float(v) for v in batch["clip_coef"]]
        nonfinite_rows = [any(int(c) > 0 for c in row) for row in batch["nonfinite"]]
        known = [v for v in norms if not math.isnan(v)]
        biggest = max(known, default=None)
        if self.max_global_norm is not None and (biggest is None or self.max_global_norm > biggest):
            biggest = self.max_global_norm
        return LocalSummary(
            path=self.path,
            steps=self.steps + len(norms),
            max_global_norm=biggest,
            clipped_steps=self.clipped_steps + sum(c < 1.0 for c in coefs),
            skipped_steps=self.skipped_steps + sum(bool(s) for s in batch["skipped"]),
            nonfinite_steps=self.nonfinite_steps
            + sum(
                row or not math.isfinite(norm)
                for row, norm in zip(nonfinite_rows, norms, strict=True)
            ),
        )


def _wire_float(value: Any) -> float:
    """A wire float of a batch this process wrote itself; ``None`` (unknown) reads as NaN."""
    return math.nan if value is None else decode_float(value)


class JsonlTransport:
    """Local mode: one JSON-lines file per run, ``<directory>/<run_id>.jsonl``.

    Each line is ``{"kind": "run"|"batch"|"status", ...}``; ``gradwatch upload``
    replays a file to a server. Keeps a running :class:`LocalSummary` per run.

    Args:
        directory: Where the files go (created if missing).

    Raises:
        OSError: The directory cannot be created.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._directory.mkdir(parents=True, exist_ok=True)
        self._summaries: dict[str, LocalSummary] = {}
        self._lock = threading.Lock()

    def path_for(self, run_id: str) -> Path:
        """File that holds the run's records."""
        return self._directory / f"{run_id}.jsonl"

    def summary(self, run_id: str) -> LocalSummary:
        """Totals of the batches written for ``run_id`` so far (thread-safe)."""
        with self._lock:
            return self._summaries.get(run_id) or LocalSummary(self.path_for(run_id))

    def create_run(self, run: RunInfo) -> None:
        self._append(run.run_id, {"kind": "run", **run.to_wire()})

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        batch = as_wire(batch)
        self._append(run_id, {"kind": "batch", "batch": batch})
        with self._lock:
            summary = self._summaries.get(run_id) or LocalSummary(self.path_for(run_id))
            self._summaries[run_id] = summary.add(batch)

    def set_status(self, run_id: str, status: str) -> None:
        self._append(run_id, {"kind": "status", "status": status})

    def close(self) -> None:
        """Nothing to release: every append opens and closes the file."""

    def _append(self, run_id: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        try:
            with self.path_for(run_id).open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            raise RetryableError(f"writing {self.path_for(run_id)}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RunFile:
    """The contents of a local-mode run file.

    Attributes:
        run: The run (from its first ``run`` record).
        batches: Wire batches in file order.
        status: The last status recorded, if any.
        unreadable_lines: Lines that did not parse (a process killed mid-write).
    """

    run: RunInfo
    batches: list[dict[str, Any]]
    status: str | None
    unreadable_lines: int


def read_run_file(path: Path) -> RunFile:
    """Read a file written by :class:`JsonlTransport` (blocks on disk I/O).

    Raises:
        OSError: The file cannot be read.
        ValueError: It holds no ``run`` record.
    """
    run: RunInfo | None = None
    batches: list[dict[str, Any]] = []
    status: str | None = None
    unreadable = 0
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind = record["kind"]
                if kind == "run" and run is None:
                    run = RunInfo.from_wire(record)
                elif kind == "batch":
                    if not isinstance(record["batch"], dict):
                        raise TypeError("batch is not an object")
                    batches.append(record["batch"])
                elif kind == "status":
                    status = str(record["status"])
            except (ValueError, KeyError, TypeError):
                unreadable += 1
    if run is None:
        raise ValueError(f"{path}: not a gradwatch run file (no run record)")
    return RunFile(run=run, batches=batches, status=status, unreadable_lines=unreadable)


class SummaryPrinter:
    """Prints a local run's totals (:meth:`LocalSummary.describe`) to stdout, once per change.

    Training-thread object; never blocks beyond the print itself.

    Args:
        transport: The run's local transport.
        run_id: The run.
        run_name: Its display name.
    """

    def __init__(self, transport: JsonlTransport, run_id: str, run_name: str) -> None:
        self._transport = transport
        self._run_id = run_id
        self._run_name = run_name
        self._printed_steps = 0

    def print_if_changed(self) -> None:
        """Print the totals unless they cover the same steps as the last print."""
        summary = self._transport.summary(self._run_id)
        if summary.steps != self._printed_steps:
            self._printed_steps = summary.steps
            print(summary.describe(self._run_name), flush=True)
