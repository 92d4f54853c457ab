"""Test doubles and builders shared by the tests and by ``bench/`` (one copy of each).

Nothing here starts a server or touches the network; the real parts live in the
fixtures of each test folder.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.agent.records import OutgoingBatch, StepBatch, as_wire
from gradwatch.agent.transport import RunInfo

NormGenerator = Callable[[np.random.Generator, int, int], np.ndarray]
"""``make(rng, steps, width)`` → ``[steps, width]`` positive norms."""


def step_batch(
    first_step: int = 0,
    steps: int = 1,
    layers: Sequence[str] = ("a",),
    *,
    loss_known: bool = False,
) -> StepBatch:
    """A batch of ``steps`` consecutive steps from ``first_step``: all norms 1, nothing clipped."""
    width = len(layers)
    return StepBatch(
        layers=tuple(layers),
        step=np.arange(first_step, first_step + steps, dtype=np.int64),
        loss=np.zeros(steps, np.float32),
        loss_known=np.full(steps, loss_known),
        global_norm=np.ones(steps, np.float32),
        global_norm_clipped=np.ones(steps, np.float32),
        clip_coef=np.ones(steps, np.float32),
        skipped=np.zeros(steps, bool),
        grad_norm=np.ones((steps, width), np.float32),
        nonfinite=np.zeros((steps, width), np.int64),
    )


class BlockingTransport:
    """A server that never answers: every call blocks until :meth:`close` (or ``release``)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def create_run(self, run: RunInfo) -> None:
        self.release.wait()

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        self.release.wait()

    def set_status(self, run_id: str, status: str) -> None:
        self.release.wait()

    def close(self) -> None:
        self.release.set()


def sqlite_file_bytes(path: str | Path) -> int:
    """Size of a SQLite database after ``VACUUM``: page size × page count, in bytes."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("VACUUM")
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
    finally:
        connection.close()
    return int(page_size * pages)


def ar1_norms(phi: float, sigma: float) -> NormGenerator:
    """Norms whose log is AR(1) with marginal standard deviation ``sigma``, started stationary."""

    def make(rng: np.random.Generator, steps: int, width: int) -> np.ndarray:
        noise = rng.standard_normal((steps, width)) * sigma * math.sqrt(1 - phi * phi)
        log_norm = np.empty((steps, width))
        log_norm[0] = sigma * rng.standard_normal(width)
        for t in range(1, steps):
            log_norm[t] = phi * log_norm[t - 1] + noise[t]
        return np.exp(log_norm)

    return make


class RecordingTransport:
    """Accepts everything and keeps it; thread-safe."""

    def __init__(self) -> None:
        self.runs: list[RunInfo] = []
        self.batches: list[dict[str, Any]] = []
        self.statuses: list[str] = []
        self.closed = False
        self._lock = threading.Lock()

    def create_run(self, run: RunInfo) -> None:
        with self._lock:
            self.runs.append(run)

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        with self._lock:
            self.batches.append(as_wire(batch))

    def set_status(self, run_id: str, status: str) -> None:
        with self._lock:
            self.statuses.append(status)

    def close(self) -> None:
        self.closed = True

    def steps(self) -> list[int]:
        return [s for b in self.batches for s in b["step"]]

    def column(self, key: str) -> np.ndarray:
        return np.concatenate([StepBatch.from_wire(b).__getattribute__(key) for b in self.batches])

    def weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``weight_norm``, ``update_ratio`` (NaN where not measured) and the measured mask."""
        parts = []
        for wire in self.batches:
            batch = StepBatch.from_wire(wire)
            shape = batch.grad_norm.shape
            if batch.weights_known is None:
                nan = np.full(shape, np.nan, np.float32)
                parts.append((nan, nan, np.zeros(shape[0], bool)))
            else:
                known = batch.weights_known[:, None]
                parts.append(
                    (
                        np.where(known, batch.weight_norm, np.nan),
                        np.where(known, batch.update_ratio, np.nan),
                        batch.weights_known,
                    )
                )
        norm, ratio, known = zip(*parts, strict=True)
        return np.concatenate(norm), np.concatenate(ratio), np.concatenate(known)
