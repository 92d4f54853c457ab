"""Prometheus metrics: stored run state read at scrape time, plus server self-metrics.

Everything lives in a per-app :class:`~prometheus_client.CollectorRegistry` (never the global
one), so several apps in one process do not clash. Run families are built from the database at
scrape time (every worker answers the same, whichever ingested) with a constant number of
queries (three), whatever the number of runs or the steps they hold, and reused for
``metrics_cache_seconds``. ``/metrics`` writes them from per-run exposition lines kept between
scrapes and formatted again only for a run whose stored state changed (:mod:`.family`), not
through ``prometheus_client``'s encoder (~5 µs a sample); the bytes are the same.

Labels are ``run_id`` (plus ``project``, ``name``, ``status`` on ``gradwatch_run_info``;
``rule`` and ``severity`` on detector counts; ``layer`` on the top-K layer norms; ``reason``
on drop and rejection counters); never a step, never a sample timestamp. Finished and failed
runs are exported for ``finished_run_grace_seconds`` after their status changed, so their
series go stale in Prometheus afterwards.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from ..config import Settings
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
from ..store import scrape as scrape_store
from ..store.db import Database
from .family import FAMILIES, RunLines, build_families, family_headers, run_samples

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

    ``/metrics`` is answered by :meth:`expose`: the self-metrics through ``prometheus_client``'s
    encoder, the run families from the attached :class:`RunStateCollector`'s pre-formatted
    text; the bytes are those ``prometheus_client`` would write for ``registry``.

    Attributes:
        registry: Everything ``/metrics`` exposes: the self-metrics (``own_registry``) and,
            once attached, the run-state collector.
        own_registry: The self-metrics alone.
        ingest_samples: ``gradwatch_ingest_samples_total``: samples stored.
        ingest_rejected: ``gradwatch_ingest_rejected_total{reason}``: batches refused.
        ingest_duration: ``gradwatch_ingest_request_duration_seconds``: batch request time.
        body_read_bytes: ``gradwatch_request_body_read_bytes_total``: request body bytes read
            from clients (bodies are read only once the caller is authenticated).
        body_decoded_bytes: ``gradwatch_request_body_decoded_bytes_total``: bytes produced by
            decoding gzip request bodies.
    """

    registry: CollectorRegistry
    own_registry: CollectorRegistry
    ingest_samples: Counter
    ingest_rejected: Counter
    ingest_duration: Histogram
    body_read_bytes: Counter
    body_decoded_bytes: Counter
    _run_collectors: list[RunStateCollector] = field(default_factory=list)

    @classmethod
    def create(cls) -> ServerMetrics:
        """Create a fresh registry with the self-metrics registered (no I/O)."""
        own = CollectorRegistry()
        home = own
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            # The metrics write to files in the directory; the exposed registry reads the
            # sum over every process from there (registering them too would list them twice).
            multiprocess.MultiProcessCollector(own, path=directory)  # type: ignore[no-untyped-call]
            home = CollectorRegistry()
        registry = CollectorRegistry()
        registry.register(own)  # a registry is a collector: its families come first
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
            own_registry=own,
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

    def attach(self, collector: RunStateCollector) -> None:
        """Export ``collector``'s run families after the self-metrics (no I/O)."""
        self.registry.register(collector)
        self._run_collectors.append(collector)

    def detach(self, collector: RunStateCollector) -> None:
        """Stop exporting ``collector`` (no I/O)."""
        self._run_collectors.remove(collector)
        self.registry.unregister(collector)

    def expose(self, accept: str) -> tuple[bytes, str]:
        """Encode everything for a scrape whose ``Accept`` header is ``accept``.

        Blocks while the run-state collectors read the database (see
        :meth:`RunStateCollector.exposition`). Thread-safe.

        Returns:
            The body and its content type: OpenMetrics 1.0 when ``accept`` asks for it, else
            the Prometheus text format 0.0.4, as :func:`prometheus_client.exposition.
            choose_encoder` decides.
        """
        encode, content_type = choose_encoder(accept)
        keywords = getattr(encode, "keywords", {})
        if keywords.get("escaping", openmetrics.UNDERSCORES) not in _NAMES_UNCHANGED:
            # An escaping that rewrites even valid names (dots): prometheus_client's way.
            return encode(self.registry), content_type
        is_openmetrics = content_type.startswith(_OPENMETRICS_TYPE)
        own = encode(self.own_registry)
        parts = [own.removesuffix(_EOF) if is_openmetrics else own]
        parts.extend(collector.exposition(is_openmetrics) for collector in self._run_collectors)
        if is_openmetrics:
            parts.append(_EOF)
        return b"".join(parts), content_type


_NAMES_UNCHANGED = (openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8, openmetrics.VALUES)
"""Escapings that leave valid metric and label names (all of gradwatch's) as they are."""
_OPENMETRICS_TYPE = "application/openmetrics-text"
_EOF = b"# EOF\n"


class RunStateCollector(Collector):
    """Exports stored run state, read from the database at scrape time (short cache).

    A scrape reads the exported runs (three queries, whatever their number; they read only
    recently active runs and no stored step, so the cost grows with live runs and their top-K
    layers, never with steps nor with old runs) and reuses the formatted samples of every run
    whose row, detection counts and drop counts are equal to those of the previous scrape;
    only changed runs are formatted again (reusing their lines' label prefixes). The answer is
    therefore always what the database holds (any worker answers the same, whichever
    ingested), and a whole answer is reused for ``metrics_cache_seconds``.

    ``collect`` and ``exposition`` block for the queries unless an answer younger than
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
        self._snapshot: _Snapshot | None = None
        self._runs: dict[str, _RunEntry] = {}
        """The last scrape's runs by id (the runs it exported, nothing older)."""

    def describe(self) -> Iterable[Metric]:
        """Return the families without samples (so registering does not query)."""
        return [spec.empty() for spec in FAMILIES]

    def collect(self) -> Iterable[Metric]:
        """Return the current families, from the cache or from the database."""
        with self._lock:
            snapshot = self._current()
            if snapshot.families is None:
                top_k = self._settings.metrics_top_k_layers
                snapshot.families = build_families(
                    run_samples(*entry.sample_arguments(), top_k) for entry in snapshot.runs
                )
            return snapshot.families

    def exposition(self, openmetrics_format: bool) -> bytes:
        """Return the run families as exposition text (UTF-8), from the cache or the database.

        Args:
            openmetrics_format: OpenMetrics 1.0 headers instead of the text format 0.0.4's
                (the sample lines are the same); no ``# EOF``.
        """
        with self._lock:
            snapshot = self._current()
            text = snapshot.texts.get(openmetrics_format)
            if text is None:
                parts: list[str] = []
                for index, header in enumerate(family_headers(openmetrics_format)):
                    parts.append(header)
                    parts.extend(entry.lines.lines[index] for entry in snapshot.runs)
                text = "".join(parts).encode()
                snapshot.texts[openmetrics_format] = text
            return text

    def _current(self) -> _Snapshot:
        """The cached snapshot, or a new one read from the database. Hold ``_lock``."""
        now = self._clock()
        snapshot = self._snapshot
        if snapshot is not None and now - snapshot.taken_at < self._settings.metrics_cache_seconds:
            return snapshot
        snapshot = _Snapshot(now, self._read(now))
        self._snapshot = snapshot
        self._runs = {entry.run_id: entry for entry in snapshot.runs}
        return snapshot

    def _read(self, now: float) -> list[_RunEntry]:
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
        drops_by_run: dict[str, list[tuple[str, int]]] = {}
        for run_id, reason, count in drops:
            drops_by_run.setdefault(run_id, []).append((reason, count))
        detections_by_run: dict[str, list[tuple[str, str, int]]] = {}
        for run_id, rule, severity, count in detections:
            detections_by_run.setdefault(run_id, []).append((rule, severity, count))
        previous = self._runs
        top_k = settings.metrics_top_k_layers
        entries = []
        for run in runs:
            run_detections = tuple(sorted(detections_by_run.get(run.run_id, ())))
            run_drops = tuple(drops_by_run.get(run.run_id, ()))
            state = (run, run_detections, run_drops)
            cached = previous.get(run.run_id)
            if cached is not None and cached.state == state:
                entries.append(cached)  # unchanged since the last scrape: same lines
                continue
            counts = _counts(run_detections)
            earlier = None if cached is None else cached.lines  # its line prefixes
            lines = RunLines.of(run, counts, run_drops, top_k, earlier)
            entries.append(_RunEntry(run.run_id, state, lines))
        return entries


@dataclass(frozen=True, slots=True)
class _RunEntry:
    """One exported run: the stored state it was formatted from, and its lines."""

    run_id: str
    state: tuple[
        scrape_store.RunScrape, tuple[tuple[str, str, int], ...], tuple[tuple[str, int], ...]
    ]
    """The run's row, its (rule, severity, count) detections sorted and its (reason, count)
    drops: equal states give equal lines."""
    lines: RunLines

    def sample_arguments(
        self,
    ) -> tuple[scrape_store.RunScrape, dict[tuple[str, str], int], tuple[tuple[str, int], ...]]:
        """The run, detection counts and drops, as :func:`.family.run_samples` takes them."""
        run, detections, drops = self.state
        return run, _counts(detections), drops


def _counts(detections: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    return {(rule, severity): count for rule, severity, count in detections}


@dataclass(slots=True)
class _Snapshot:
    """One scrape's answer: the exported runs and, once asked for, their families and text."""

    taken_at: float
    runs: list[_RunEntry]
    families: list[Metric] | None = None
    texts: dict[bool, bytes] = field(default_factory=dict)
