"""Prometheus metrics: stored run state read at scrape time, plus server self-metrics.

Everything lives in a per-app :class:`~prometheus_client.CollectorRegistry` (never the global
one), so several apps in one process do not clash. A scrape runs a constant number of queries
(two), whatever the number of runs. Labels are ``run_id`` (plus ``project``, ``name``,
``status`` on ``gradwatch_run_info`` and ``reason`` on drop and rejection counters); never a
step, never a sample timestamp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server import repository
from gradwatch.server.db import Database
from gradwatch.server.errors import (
    VALIDATION_ERROR_CODE,
    AuthenticationError,
    BatchConflictError,
    InvalidBatchError,
    MalformedBodyError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    RunNotFoundError,
    UnsupportedEncodingError,
)

__all__ = ["RunStateCollector", "ServerMetrics"]

_REJECTION_REASONS = (
    VALIDATION_ERROR_CODE,
    InvalidBatchError.code,
    RunNotFoundError.code,
    BatchConflictError.code,
    PayloadTooLargeError.code,
    UnsupportedEncodingError.code,
    MalformedBodyError.code,
    AuthenticationError.code,
    PermissionDeniedError.code,
    RateLimitedError.code,
)


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """The per-app registry and the server's own metrics. Thread-safe.

    Attributes:
        registry: Registry exposed at ``/metrics``.
        ingest_samples: ``gradwatch_ingest_samples_total``: samples stored.
        ingest_rejected: ``gradwatch_ingest_rejected_total{reason}``: batches refused.
        ingest_duration: ``gradwatch_ingest_request_duration_seconds``: batch request time.
    """

    registry: CollectorRegistry
    ingest_samples: Counter
    ingest_rejected: Counter
    ingest_duration: Histogram

    @classmethod
    def create(cls) -> ServerMetrics:
        """Create a fresh registry with the self-metrics registered (no I/O)."""
        registry = CollectorRegistry()
        rejected = Counter(
            "gradwatch_ingest_rejected",
            "Batches refused, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in _REJECTION_REASONS:
            rejected.labels(reason=reason)
        return cls(
            registry=registry,
            ingest_samples=Counter(
                "gradwatch_ingest_samples",
                "Samples (one value of one series at one step) stored.",
                registry=registry,
            ),
            ingest_rejected=rejected,
            ingest_duration=Histogram(
                "gradwatch_ingest_request_duration_seconds",
                "Time to handle one batch request, decoding included, in seconds.",
                registry=registry,
            ),
        )

    def record_rejection(self, reason: str) -> None:
        """Count one refused batch."""
        self.ingest_rejected.labels(reason=reason).inc()


class RunStateCollector(Collector):
    """Exports stored run state, read from the database at each scrape.

    ``collect`` blocks for two queries; it is called by the scraping thread and is
    thread-safe (each call uses its own session).
    """

    def __init__(self, database: Database) -> None:
        """Read runs from ``database``; does not connect until the first scrape."""
        self._database = database

    def describe(self) -> Iterable[Metric]:
        """Return the families without samples (so registering does not query)."""
        return list(_Families().all())

    def collect(self) -> Iterable[Metric]:
        """Query the database and return the current families."""
        families = _Families()
        with self._database.read_session() as session:
            runs = repository.scrape_runs(session)
            drops = repository.scrape_agent_drops(session)
        for run in runs:
            families.run_info.add_metric([run.run_id, run.project, run.name, run.status], 1)
            if run.last_step is not None:
                families.run_step.add_metric([run.run_id], run.last_step)
            if run.last_ingest_at is not None:
                families.last_ingest.add_metric([run.run_id], run.last_ingest_at.timestamp())
            families.clipped.add_metric([run.run_id], run.clipped_steps)
            families.skipped.add_metric([run.run_id], run.skipped_steps)
            families.nonfinite.add_metric([run.run_id], run.nonfinite_values)
            if run.global_norm_last_step is not None:
                families.global_norm.add_metric([run.run_id], _value(run.global_norm_last))
            if run.loss_last_step is not None:
                families.loss.add_metric([run.run_id], _value(run.loss_last))
        for run_id, reason, count in drops:
            families.dropped.add_metric([run_id, reason], count)
        return list(families.all())


def _value(stored: float | None) -> float:
    """A stored float; NULL stands for NaN."""
    return math.nan if stored is None else stored


class _Families:
    """Fresh, empty metric families for one scrape."""

    def __init__(self) -> None:
        run = ["run_id"]
        self.run_info = GaugeMetricFamily(
            "gradwatch_run_info",
            "Run metadata; always 1.",
            labels=[*run, "project", "name", "status"],
        )
        self.run_step = GaugeMetricFamily(
            "gradwatch_run_step", "Highest training step stored.", labels=run
        )
        self.last_ingest = GaugeMetricFamily(
            "gradwatch_run_last_ingest_timestamp_seconds",
            "Unix time of the last stored batch, in seconds.",
            labels=run,
        )
        self.global_norm = GaugeMetricFamily(
            "gradwatch_global_grad_norm",
            "Global gradient L2 norm (before clipping) at the last stored step.",
            labels=run,
        )
        self.loss = GaugeMetricFamily(
            "gradwatch_loss", "Loss at the last stored step that reported one.", labels=run
        )
        self.clipped = CounterMetricFamily(
            "gradwatch_clipped_steps", "Steps whose gradient was clipped.", labels=run
        )
        self.skipped = CounterMetricFamily(
            "gradwatch_skipped_steps", "Steps whose update was skipped.", labels=run
        )
        self.nonfinite = CounterMetricFamily(
            "gradwatch_nonfinite_grad_values",
            "Non-finite gradient values seen, over all layers.",
            labels=run,
        )
        self.dropped = CounterMetricFamily(
            "gradwatch_agent_dropped_batches",
            "Batches the agent dropped before sending, by reason (as last reported).",
            labels=[*run, "reason"],
        )

    def all(self) -> Iterator[Metric]:
        yield from (
            self.run_info,
            self.run_step,
            self.last_ingest,
            self.global_norm,
            self.loss,
            self.clipped,
            self.skipped,
            self.nonfinite,
            self.dropped,
        )
