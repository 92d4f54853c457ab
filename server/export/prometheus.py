"""Prometheus metrics: stored run state read at scrape time, plus server self-metrics.

Everything lives in a per-app :class:`~prometheus_client.CollectorRegistry` (never the global
one), so several apps in one process do not clash. Run families are built from the database at
scrape time (every worker answers the same, whichever ingested) with a constant number of
queries (three), whatever the number of runs, and reused for ``metrics_cache_seconds``.

Labels are ``run_id`` (plus ``project``, ``name``, ``status`` on ``gradwatch_run_info``;
``rule`` and ``severity`` on detector counts; ``layer`` on the top-K layer norms; ``reason``
on drop and rejection counters); never a step, never a sample timestamp. Finished and failed
runs are exported for ``finished_run_grace_seconds`` after their status changed, so their
series go stale in Prometheus afterwards.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import Settings
from ..detect import Rule, Severity
from ..errors import (
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
    UnsupportedMediaTypeError,
)
from ..schemas import decode_float
from ..store import scrape as scrape_store
from ..store.db import Database

__all__ = ["MULTIPROCESS_ENV", "RunStateCollector", "ServerMetrics"]

_REJECTION_REASONS = (
    VALIDATION_ERROR_CODE,
    InvalidBatchError.code,
    RunNotFoundError.code,
    BatchConflictError.code,
    PayloadTooLargeError.code,
    UnsupportedEncodingError.code,
    UnsupportedMediaTypeError.code,
    MalformedBodyError.code,
    AuthenticationError.code,
    PermissionDeniedError.code,
    RateLimitedError.code,
)


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's multiprocess directory; ``gradwatch server --workers N`` sets it."""


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """The per-app registry and the server's own metrics. Thread-safe.

    With :data:`MULTIPROCESS_ENV` set (before ``prometheus_client`` is imported, as
    ``gradwatch server --workers N`` does for its workers), the self-metrics live in that
    directory and ``/metrics`` on any worker reports their sum over all workers
    (``MultiProcessCollector``), so counters never jump between scrapes.

    Attributes:
        registry: Registry exposed at ``/metrics``.
        ingest_samples: ``gradwatch_ingest_samples_total``: samples stored.
        ingest_rejected: ``gradwatch_ingest_rejected_total{reason}``: batches refused.
        ingest_duration: ``gradwatch_ingest_request_duration_seconds``: batch request time.
        body_read_bytes: ``gradwatch_request_body_read_bytes_total``: request body bytes read
            from clients (bodies are read only once the caller is authenticated).
        body_decoded_bytes: ``gradwatch_request_body_decoded_bytes_total``: bytes produced by
            decoding gzip request bodies.
    """

    registry: CollectorRegistry
    ingest_samples: Counter
    ingest_rejected: Counter
    ingest_duration: Histogram
    body_read_bytes: Counter
    body_decoded_bytes: Counter

    @classmethod
    def create(cls) -> ServerMetrics:
        """Create a fresh registry with the self-metrics registered (no I/O)."""
        registry = CollectorRegistry()
        home = registry
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            # The metrics write to files in the directory; the exposed registry reads the
            # sum over every process from there (registering them too would list them twice).
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            home = CollectorRegistry()
        rejected = Counter(
            "gradwatch_ingest_rejected",
            "Batches refused, by reason.",
            ["reason"],
            registry=home,
        )
        for reason in _REJECTION_REASONS:
            rejected.labels(reason=reason)
        return cls(
            registry=registry,
            ingest_samples=Counter(
                "gradwatch_ingest_samples",
                "Samples (one value of one series at one step) stored.",
                registry=home,
            ),
            ingest_rejected=rejected,
            ingest_duration=Histogram(
                "gradwatch_ingest_request_duration_seconds",
                "Time to handle one batch request, decoding included, in seconds.",
                registry=home,
            ),
            body_read_bytes=Counter(
                "gradwatch_request_body_read_bytes",
                "Request body bytes read from clients (only once the caller is authenticated).",
                registry=home,
            ),
            body_decoded_bytes=Counter(
                "gradwatch_request_body_decoded_bytes",
                "Bytes produced by decoding gzip request bodies.",
                registry=home,
            ),
        )

    def record_rejection(self, reason: str) -> None:
        """Count one refused batch."""
        self.ingest_rejected.labels(reason=reason).inc()


class RunStateCollector(Collector):
    """Exports stored run state, read from the database at scrape time (short cache).

    ``collect`` blocks for three queries unless a cached answer younger than
    ``metrics_cache_seconds`` exists. Thread-safe: concurrent scrapes wait for one query set.
    """

    def __init__(
        self,
        database: Database,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Read runs from ``database``; does not connect until the first scrape.

        Args:
            database: Where runs are stored.
            settings: Cache time, top-K, grace periods.
            clock: Unix time in seconds (injectable for tests).
        """
        self._database = database
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def describe(self) -> Iterable[Metric]:
        """Return the families without samples (so registering does not query)."""
        return list(_Families().all())

    def collect(self) -> Iterable[Metric]:
        """Return the current families, from the cache or from the database."""
        with self._lock:
            now = self._clock()
            if (
                self._cached is not None
                and now - self._cached[0] < self._settings.metrics_cache_seconds
            ):
                return self._cached[1]
            families = self._query(now)
            self._cached = (now, families)
            return families

    def _query(self, now: float) -> list[Metric]:
        settings = self._settings
        moment = datetime.fromtimestamp(now, UTC)
        window = {
            "finished_since": moment - timedelta(seconds=settings.finished_run_grace_seconds),
            "ingested_since": moment - timedelta(seconds=settings.inactive_run_seconds),
        }
        with self._database.read_session() as session:
            runs = scrape_store.scrape_runs(session, **window)
            drops = scrape_store.scrape_agent_drops(session, **window)
            detections = scrape_store.scrape_detector_counts(session, **window)
        families = _Families()
        for run in runs:
            families.add_run(run)
            families.add_layers(run, settings.metrics_top_k_layers)
        counts = {(run_id, rule, severity): n for run_id, rule, severity, n in detections}
        for run in runs:
            for rule in Rule:
                for severity in Severity:
                    # Every (rule, severity) from 0, so the first detection is an increase.
                    count = counts.get((run.run_id, rule.value, severity.value), 0)
                    families.detections.add_metric([run.run_id, rule.value, severity.value], count)
        for run_id, reason, count in drops:
            families.dropped.add_metric([run_id, reason], count)
        return list(families.all())


def _value(stored: float | None) -> float:
    """A stored float; NULL stands for NaN."""
    return math.nan if stored is None else stored


def _window_max(*maxima: float | None) -> float | None:
    present = [value for value in maxima if value is not None]
    return max(present) if present else None


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
        self.steps = CounterMetricFamily("gradwatch_steps", "Training steps stored.", labels=run)
        self.global_norm = GaugeMetricFamily(
            "gradwatch_global_grad_norm",
            "Global gradient L2 norm (before clipping) at the last stored step.",
            labels=run,
        )
        self.clipped_norm = GaugeMetricFamily(
            "gradwatch_global_grad_norm_clipped",
            "Global gradient L2 norm after clipping at the last stored step.",
            labels=run,
        )
        self.window_max = GaugeMetricFamily(
            "gradwatch_global_grad_norm_window_max",
            "Largest global gradient norm (before clipping) ingested in the current and "
            "previous window of norm_window_seconds; NaN ignored, +Inf kept.",
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
        self.detections = CounterMetricFamily(
            "gradwatch_detector_events",
            "Detections (a rule firing on one step of one series), by rule and severity.",
            labels=[*run, "rule", "severity"],
        )
        self.layer_norm = GaugeMetricFamily(
            "gradwatch_layer_grad_norm",
            "Gradient L2 norm of a layer at its last stored step; only the top-K layers of "
            "each run by that norm (NaN first).",
            labels=[*run, "layer"],
        )
        self.truncated = GaugeMetricFamily(
            "gradwatch_layer_series_truncated",
            "1 when the run has more layers than gradwatch_layer_grad_norm exports, else 0.",
            labels=run,
        )
        self.dropped = CounterMetricFamily(
            "gradwatch_agent_dropped_batches",
            "Batches the agent dropped before sending, by reason (as last reported).",
            labels=[*run, "reason"],
        )

    def add_run(self, run: scrape_store.RunScrape) -> None:
        """Add the run-level samples of one run."""
        labels = [run.run_id]
        self.run_info.add_metric([run.run_id, run.project, run.name, run.status], 1)
        if run.last_step is not None:
            self.run_step.add_metric(labels, run.last_step)
        if run.last_ingest_at is not None:
            self.last_ingest.add_metric(labels, run.last_ingest_at.timestamp())
        self.steps.add_metric(labels, run.num_steps)
        self.clipped.add_metric(labels, run.clipped_steps)
        self.skipped.add_metric(labels, run.skipped_steps)
        self.nonfinite.add_metric(labels, run.nonfinite_values)
        if run.global_norm_last_step is not None:
            self.global_norm.add_metric(labels, _value(run.global_norm_last))
        if run.clipped_norm_last_step is not None:
            self.clipped_norm.add_metric(labels, _value(run.clipped_norm_last))
        window_max = _window_max(run.norm_window_max, run.norm_window_previous_max)
        if window_max is not None:
            self.window_max.add_metric(labels, window_max)
        if run.loss_last_step is not None:
            self.loss.add_metric(labels, _value(run.loss_last))

    def add_layers(self, run: scrape_store.RunScrape, k: int) -> None:
        """Add the norms of the run's top-``k`` layers and the truncation flag."""
        if run.top_layers is None:
            return
        top = run.top_layers["top"][:k]
        for layer, value in top:
            self.layer_norm.add_metric([run.run_id, layer], decode_float(value))
        self.truncated.add_metric([run.run_id], int(run.top_layers["layers"] > len(top)))

    def all(self) -> Iterator[Metric]:
        yield from (
            self.run_info,
            self.run_step,
            self.last_ingest,
            self.steps,
            self.global_norm,
            self.clipped_norm,
            self.window_max,
            self.loss,
            self.clipped,
            self.skipped,
            self.nonfinite,
            self.detections,
            self.layer_norm,
            self.truncated,
            self.dropped,
        )
