"""The batches of ``bench/load.py``: what each simulated agent sends, built before the clock
starts, and what the detectors should make of it.

Pure (NumPy, JSON or MessagePack, gzip); no I/O; building one is CPU work of a few seconds
at full size.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np

from gradwatch.agent.records import StepBatch
from gradwatch.server.detect import DetectorConfig, DetectorState, StepColumns, detect

__all__ = ["Options", "Workload"]

_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
_VARIANTS = 8


@dataclass(frozen=True)
class Options:
    """The load: ``runs`` agents of ``layers`` layers, a step every ``step_seconds``, a batch
    of ``steps_per_batch`` steps per ``batch_seconds``, for a window of ``seconds``; scrapes
    and reads every ``scrape_seconds`` and ``read_seconds``; ``resend_fraction`` of batches
    sent twice; each batch as the ``body`` kind."""

    runs: int
    layers: int
    steps_per_batch: int
    step_seconds: float
    seconds: float
    scrape_seconds: float
    read_seconds: float
    resend_fraction: float
    body: str = "binary"
    """``binary`` (what the agent sends) or ``json``."""

    @property
    def batch_seconds(self) -> float:
        """Seconds between two batches of a run."""
        return self.steps_per_batch * self.step_seconds

    @property
    def batches_per_run(self) -> int:
        """Batches built per run (one more than the window can hold)."""
        return math.ceil(self.seconds / self.batch_seconds) + 1

    @property
    def samples_per_batch(self) -> int:
        """Values one batch carries (5 run-level and 2 per-layer fields a step, and the
        weight norm and update ratio of each layer on the one measured step)."""
        return self.steps_per_batch * (5 + 2 * self.layers) + 2 * self.layers  # + weight stats


class Workload:
    """Every batch of every run gzipped as ``options.body`` (``bodies[run][batch]``, the
    agent's own ``StepBatch`` encodings), and the detections by (rule,
    severity) after each prefix of a run's batches (``expected[variant][batches]``). Eight
    data sets (``variants``); run ``r`` sends set ``r % 8`` under its own batch ids."""

    def __init__(self, options: Options, seed: int = 0) -> None:
        self.options = options
        layers = tuple(f"model/block_{i}/dense" for i in range(options.layers))
        variants = min(_VARIANTS, options.runs)
        templates: list[list[bytes]] = []
        self.expected: list[list[Counter[tuple[str, str]]]] = []
        for v in range(variants):
            batches = [
                self._batch(layers, v, b, np.random.default_rng([seed, v, b]))
                for b in range(options.batches_per_run)
            ]
            templates.append([self._encode(b, options.body) for b in batches])
            self.expected.append(self._detections(batches))
        placeholder = _PLACEHOLDER.encode()
        self.bodies = [
            [gzip.compress(t.replace(placeholder, str(uuid.uuid4()).encode()), 5) for t in ts]
            for ts in (templates[r % variants] for r in range(options.runs))
        ]
        self.variants = variants

    @staticmethod
    def _encode(batch: StepBatch, body: str) -> bytes:
        """The batch as the agent's transport sends it (before gzip): the binary body, or
        JSON; its batch id (a 36-character placeholder) is replaced per run, in place."""
        if body == "binary":
            return batch.to_binary()
        return json.dumps(batch.to_wire(), separators=(",", ":"), allow_nan=False).encode()

    def _batch(
        self, layers: tuple[str, ...], variant: int, index: int, rng: np.random.Generator
    ) -> StepBatch:
        """One agent batch: lognormal norms per layer; now and then a non-finite value and,
        past the detectors' warm-up, a 50× spike."""
        n, width = self.options.steps_per_batch, len(layers)
        first = index * n
        scale = np.exp(np.linspace(-3.0, 1.0, width) + 0.3 * (variant % 3))
        grad = (scale * rng.lognormal(0.0, 0.3, size=(n, width))).astype(np.float32)
        nonfinite = np.zeros((n, width), np.int64)
        if index % 4 == 3:
            nonfinite[10, (variant * 7 + index) % width] = 2
            grad[10, (variant * 7 + index) % width] = np.nan
        if first >= 300 and index % 5 == 4:
            grad[20, (variant * 3 + index) % width] *= 50.0
        squares = np.nansum(grad.astype(np.float64) ** 2, axis=1)
        glob = np.where(nonfinite.any(axis=1), np.nan, np.sqrt(squares)).astype(np.float32)
        clip = np.minimum(1.0, 5.0 / glob).astype(np.float32)
        measured = np.zeros(n, np.bool_)
        measured[0] = True
        return StepBatch(
            layers=layers,
            step=np.arange(first, first + n, dtype=np.int64),
            loss=(2.0 / (1 + np.arange(first, first + n) / 500)).astype(np.float32),
            loss_known=np.ones(n, np.bool_),
            global_norm=glob,
            global_norm_clipped=np.fmin(glob, 5.0).astype(np.float32),
            clip_coef=np.where(np.isnan(clip), 1.0, clip).astype(np.float32),
            skipped=np.zeros(n, np.bool_),
            grad_norm=grad,
            nonfinite=nonfinite,
            batch_id=_PLACEHOLDER,
            weight_norm=np.full((n, width), 3.0, np.float32),
            update_ratio=np.full((n, width), 1e-3, np.float32),
            weights_known=measured,
        )

    @staticmethod
    def _detections(batches: list[StepBatch]) -> list[Counter[tuple[str, str]]]:
        """Detections by (rule, severity) after each prefix of the batches (default
        thresholds, as the server runs them on these float32 values)."""
        state: DetectorState | None = None
        total: Counter[tuple[str, str]] = Counter()
        prefixes = [Counter(total)]
        for batch in batches:
            columns = StepColumns(
                steps=batch.step,
                layers=batch.layers,
                global_norm=batch.global_norm,
                grad_norm=batch.grad_norm,
                nonfinite=batch.nonfinite,
                clip_coef=batch.clip_coef,
                skipped=batch.skipped,
                loss=batch.loss,
            )
            result = detect(state, columns, DetectorConfig())
            state = result.state
            for (rule, severity), count in result.triggers.items():
                total[rule.value, severity.value] += count
            prefixes.append(Counter(total))
        return prefixes
