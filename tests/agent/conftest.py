"""Fakes for the network edge: a transport that records what it is given."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from gradwatch.agent.records import StepBatch
from gradwatch.agent.transport import RunInfo


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

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        with self._lock:
            self.batches.append(batch)

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


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture(scope="session")
def mirrored():
    """MirroredStrategy over the two logical CPUs that tests/conftest.py configures.

    One for the whole session: separate MirroredStrategy objects in one process
    reuse collective instance keys and abort each other's all-reduces.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
