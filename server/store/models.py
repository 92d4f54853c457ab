"""SQLAlchemy models: the storage schema (DESIGN.md §5 "Storage at scale").

Samples are stored in :class:`Block` rows: one row per (series, ingested batch) holding the
batch's values of that series as one packed array plus summary columns, so a run of 10⁶ steps ×
500 layers is 10⁴ rows per series rather than 10⁶. :class:`Series` carries running summaries
(count, min, max, sum, last) so per-layer and per-run overviews read one row per series.

Conventions:
    * NaN is never stored in a float column (SQLite turns it into NULL): a NULL ``vmin``/``vmax``
      means "no non-NaN value", a NULL ``vlast`` (with a non-NULL ``last_step``) means the last
      value was NaN, a NULL ``vsum`` means the sum is undefined. ±Inf is stored as is.
    * Timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AgentDrop",
    "ApiToken",
    "Base",
    "Batch",
    "Block",
    "DetectorCount",
    "DetectorState",
    "Event",
    "Incident",
    "ProjectSettings",
    "Run",
    "RunStatus",
    "Series",
    "UTCDateTime",
]

_NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_SERIES_ID = BigInteger().with_variant(Integer(), "sqlite")
"""64-bit ids; plain INTEGER on SQLite so the column aliases the rowid and autoincrements."""


RUN_LEVEL: Final = ""
"""Layer name of the run-level series (global norm, loss, clip rate) in every table."""


class RunStatus(enum.StrEnum):
    """Lifecycle state of a run."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC; reject naive ones (their zone is unknown)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: gradwatch stores timezone-aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime (SQLite hands back naive UTC values)."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable names for migrations)."""

    metadata = MetaData(naming_convention=_NAMING_CONVENTION)


class Run(Base):
    """One training run, created by the agent with a client-made uuid.

    The running totals are updated in the same transaction as each ingested batch.
    """

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    """Set with ``created_at``, by every ingested batch (with ``last_ingest_at``) and by every
    status change, so never older than either (the scrape's window relies on it)."""
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    """Highest step stored, or NULL before the first batch."""
    last_ingest_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    num_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    clipped_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    """Steps whose clip coefficient was < 1."""
    skipped_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    nonfinite_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    """Steps with a non-finite global norm or any non-finite gradient value."""
    nonfinite_values: Mapped[int] = mapped_column(BigInteger, default=0)
    """Sum of the per-layer non-finite gradient value counts."""
    norm_window_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    """Start of the current window of ``gradwatch_global_grad_norm_window_max`` (ingest time)."""
    norm_window_max: Mapped[float | None] = mapped_column(Double)
    """Largest global norm ingested in the current window; NULL when none (or all NaN)."""
    norm_window_previous_max: Mapped[float | None] = mapped_column(Double)
    """Largest global norm ingested in the window before; NULL when none."""
    top_layers: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """The layers with the largest gradient norm at the newest stored step, for the exporter:
    ``{"layers": <layers in that batch>, "top": [[layer, norm], ...]}``, NaN first, at most
    ``metrics_top_k_layers`` (as set at ingest) entries; non-finite norms as the wire strings
    ``"NaN"``, ``"Infinity"``. Kept at ingest so a scrape reads one row per run."""

    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'finished', 'failed')",
            name="status",
        ),
        Index(None, "created_at", "id"),
        Index(None, "project", "created_at", "id"),
        Index(None, "updated_at"),  # the scrape's window (store.scrape), retention
    )


class Series(Base):
    """One metric of one run (``layer == ''``) or of one layer of a run, with running summaries.

    The layer order of a run is the id order of its ``grad_norm`` series.
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(_SERIES_ID, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("runs.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(32))
    layer: Mapped[str] = mapped_column(String(1024))
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    """Samples stored (NaN values included)."""
    nan_count: Mapped[int] = mapped_column(BigInteger, default=0)
    vmin: Mapped[float | None] = mapped_column(Double)
    vmax: Mapped[float | None] = mapped_column(Double)
    vsum: Mapped[float | None] = mapped_column(Double)
    """Sum of the non-NaN values; NULL when undefined (no values, or +Inf and -Inf both seen)."""
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    vlast: Mapped[float | None] = mapped_column(Double)
    """Value at ``last_step``; NULL means NaN."""

    __table_args__ = (
        UniqueConstraint("run_id", "metric", "layer"),
        # Every batch rewrites its series' summaries: room on the page keeps those updates
        # heap-only on PostgreSQL (migration 0007).
        {"postgresql_with": {"fillfactor": 50}},
    )


class Block(Base):
    """The values of one series from one ingested batch, packed (the sample store).

    On SQLite the table is ``WITHOUT ROWID``: the primary key *is* the table, so a block costs
    its packed bytes plus a few dozen bytes of key and summary.
    """

    __tablename__ = "blocks"

    series_id: Mapped[int] = mapped_column(
        _SERIES_ID, ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    first_step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    last_step: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    """Values in the block (NaN included)."""
    nan_count: Mapped[int] = mapped_column(Integer)
    vmin: Mapped[float | None] = mapped_column(Double)
    """Minimum over the non-NaN values (±Inf included); NULL iff every value is NaN."""
    vmax: Mapped[float | None] = mapped_column(Double)
    vlast: Mapped[float | None] = mapped_column(Double)
    """Value at ``last_step``; NULL means NaN."""
    steps: Mapped[bytes | None] = mapped_column(LargeBinary)
    """Little-endian int64 steps, or NULL when they are exactly ``first_step..last_step``."""
    values: Mapped[bytes | None] = mapped_column(LargeBinary)
    """Little-endian float32 (float metrics) or int64 (count metrics) values, or NULL when every
    value is bitwise equal to ``vmin`` and none is NaN."""

    __table_args__ = ({"sqlite_with_rowid": False},)


class Rollup(Base):
    """Per-layer maxima of one per-layer metric of a run over one chunk of steps (see
    :mod:`gradwatch.server.store.rollup`), for heatmaps wider than a chunk.

    The three packed columns are parallel arrays over the series holding a value in the chunk,
    in ascending series id. On SQLite the table is ``WITHOUT ROWID``, like ``blocks``.
    """

    __tablename__ = "rollups"

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    chunk: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    """Steps ``chunk * CHUNK_STEPS .. (chunk + 1) * CHUNK_STEPS - 1``."""
    series: Mapped[bytes] = mapped_column(LargeBinary)
    """Little-endian int64 series ids, ascending."""
    vmax: Mapped[bytes] = mapped_column(LargeBinary)
    """Little-endian float64 maximum of the non-NaN values; NaN when every value is NaN."""
    nan_count: Mapped[bytes] = mapped_column(LargeBinary)
    """Little-endian int64 count of NaN values."""

    __table_args__ = ({"sqlite_with_rowid": False},)


class Batch(Base):
    """One accepted ``StepBatch`` (the idempotency record)."""

    __tablename__ = "batches"

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    batch_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    n_steps: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index(None, "run_id", "first_step"),)


class AgentDrop(Base):
    """Batches the agent dropped, by reason: the latest cumulative count it reported."""

    __tablename__ = "dropped_batches"

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    as_of_step: Mapped[int] = mapped_column(BigInteger)
    """Last step of the batch that reported ``count``; older reports never overwrite newer."""


class Incident(Base):
    """An incident bundle the agent wrote and announced: where it lies and what it holds.

    One per (run, step); the first announcement of a step is kept, later ones only add the
    recorder's rows of steps not stored yet (a resend is a no-op). The bundle itself stays
    on the training host (``host``, ``path``): the server stores where."""

    __tablename__ = "incidents"

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    cause: Mapped[str] = mapped_column(String(16))
    """Why the step was captured: ``nonfinite``, ``skipped`` or ``explosion``."""
    path: Mapped[str] = mapped_column(String(4096))
    host: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    """Size of the bundle's checkpoint on disk."""
    format: Mapped[str] = mapped_column(String(64))
    learning_rate: Mapped[float | None] = mapped_column(Double)
    loss_scale: Mapped[float | None] = mapped_column(Double)
    recorded: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """The flight recorder's rows around the step (``IncidentRows`` as JSON), or NULL."""
    announced_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """An API token of one project (see ``auth``). Only a hash of the secret is stored.

    A token reads ``gw_<key>_<secret>``: ``key`` is public and finds the row, the SHA-256 of
    the whole token is compared in constant time with ``token_hash``.
    """

    __tablename__ = "api_tokens"

    key: Mapped[str] = mapped_column(String(16), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    """Hex SHA-256 of the whole token."""
    project: Mapped[str] = mapped_column(String(100))
    scopes: Mapped[str] = mapped_column(String(64))
    """Comma-separated, sorted scopes (``ingest``, ``read``)."""
    name: Mapped[str] = mapped_column(String(200))
    """Free description given at creation."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    """When the token was revoked; NULL while it is valid."""


class Event(Base):
    """A detector event: consecutive detections of one rule on one series, merged within the
    rule's cooldown (see ``detect``). ``layer == ''`` for run-level events."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(_SERIES_ID, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("runs.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(16))
    layer: Mapped[str] = mapped_column(String(1024))
    severity: Mapped[str] = mapped_column(String(16))
    """Highest severity among the merged detections."""
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(BigInteger)
    """Detections (steps on which the rule fired) merged into the event."""
    value: Mapped[float] = mapped_column(Double)
    """Most extreme value seen (a norm, a count or a fraction; ±Inf possible, never NaN)."""
    baseline: Mapped[float | None] = mapped_column(Double)
    """What ``value`` was compared with, when the rule has a baseline."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    onset: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """Onset analysis of a run-level explosion, non-finite or loss event (``detect.Onset``
    as JSON), fixed when the event starts; NULL for other events and for events stored
    before revision 0005."""

    __table_args__ = (
        Index(None, "run_id", "first_step", "id"),
        Index(None, "run_id", "rule", "layer", "last_step"),
    )


class DetectorCount(Base):
    """Detections of a run by rule and severity (``gradwatch_detector_events_total``).

    Only ever incremented, so the exported counter never goes down when events merge or
    escalate."""

    __tablename__ = "detector_counts"

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    rule: Mapped[str] = mapped_column(String(16), primary_key=True)
    severity: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class DetectorState(Base):
    """The detectors' per-run state (``detect.DetectorState`` serialised), written in the same
    transaction as each ingested batch, so it survives restarts and is shared by workers."""

    __tablename__ = "detector_states"

    run_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ProjectSettings(Base):
    """Per-project settings: the detector thresholds (``detect.DetectorConfig`` as JSON)."""

    __tablename__ = "project_settings"

    project: Mapped[str] = mapped_column(String(100), primary_key=True)
    detectors: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
