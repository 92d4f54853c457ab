"""Typed SQL statements over the storage schema; no HTTP here.

Every function takes an open :class:`~sqlalchemy.orm.Session`, runs a few statements in its
current transaction (beginning one if needed) and never commits: the caller owns the
transaction. Calls block on the database. A session belongs to one thread at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, aliased

from .block import BlockSummaries, StoredBlock
from .metric import LAYER_ORDER_METRIC, Metric
from .models import (
    RUN_LEVEL,
    AgentDrop,
    Batch,
    Block,
    DetectorCount,
    DetectorState,
    Event,
    ProjectSettings,
    Run,
    RunStatus,
    Series,
)

__all__ = [
    "RUN_LEVEL",
    "BatchRecord",
    "EventCursor",
    "EventFilter",
    "LayerStats",
    "RunScrape",
    "SeriesKey",
    "SeriesState",
    "add_detector_counts",
    "bucket_inner_blocks",
    "count_inner_blocks",
    "count_layers",
    "fetch_block_summaries",
    "fetch_blocks",
    "fetch_cut_blocks",
    "fetch_split_blocks",
    "find_overlapping_batches",
    "find_series_id",
    "get_agent_drops",
    "get_batch",
    "get_detector_counts",
    "get_detector_state",
    "get_latest_events",
    "get_project_detectors",
    "get_run",
    "get_run_project",
    "get_run_series_states",
    "get_series_states",
    "has_layer",
    "insert_batch",
    "insert_blocks",
    "insert_series",
    "list_events",
    "list_layer_stats",
    "list_runs",
    "put_detector_state",
    "put_project_detectors",
    "scrape_agent_drops",
    "scrape_detector_counts",
    "scrape_runs",
    "summarise_event_layers",
    "update_series_states",
    "upsert_agent_drops",
]

_CRITICAL = "critical"
_WARNING = "warning"
"""Stored spellings of the two severities (``Event.severity``)."""

SeriesKey = tuple[str, str]
"""(metric, layer) of a series within one run; ``layer`` is ``""`` for run-level metrics."""


@dataclass(frozen=True, slots=True)
class SeriesState:
    """A series' id and running summary (see ``models.Series`` for the NULL conventions)."""

    id: int
    count: int
    nan_count: int
    vmin: float | None
    vmax: float | None
    vsum: float | None
    last_step: int | None
    vlast: float | None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """An accepted batch."""

    batch_id: str
    first_step: int
    last_step: int
    n_steps: int


@dataclass(frozen=True, slots=True)
class LayerStats:
    """Summary of a layer's ``grad_norm`` series plus its non-finite value total."""

    name: str
    count: int
    last_step: int | None
    vlast: float | None
    vmax: float | None
    nonfinite_values: int


@dataclass(frozen=True, slots=True)
class RunScrape:
    """What the Prometheus collector exports for one run."""

    run_id: str
    project: str
    name: str
    status: str
    last_step: int | None
    last_ingest_at: datetime | None
    clipped_steps: int
    skipped_steps: int
    nonfinite_values: int
    num_steps: int
    norm_window_max: float | None
    norm_window_previous_max: float | None
    global_norm_last_step: int | None
    global_norm_last: float | None
    """Global norm at ``global_norm_last_step``; NULL means NaN."""
    clipped_norm_last_step: int | None
    clipped_norm_last: float | None
    """Global norm after clipping at ``clipped_norm_last_step``; NULL means NaN."""
    loss_last_step: int | None
    loss_last: float | None
    """Loss at ``loss_last_step``; NULL means NaN."""
    top_layers: dict[str, Any] | None
    """See ``Run.top_layers``."""


_BLOCKS = cast(Table, Block.__table__)

_STATE_COLUMNS = (
    Series.id,
    Series.count,
    Series.nan_count,
    Series.vmin,
    Series.vmax,
    Series.vsum,
    Series.last_step,
    Series.vlast,
)


# Runs ---------------------------------------------------------------------------------------


def get_run(session: Session, run_id: str, *, for_update: bool = False) -> Run | None:
    """Load a run; ``for_update`` locks its row until the transaction ends (PostgreSQL)."""
    return session.get(Run, run_id, with_for_update=for_update, populate_existing=for_update)


def get_run_project(session: Session, run_id: str) -> str | None:
    """Return the project of a run, or None when no run has this id."""
    return session.execute(select(Run.project).where(Run.id == run_id)).scalar_one_or_none()


def list_runs(
    session: Session,
    *,
    project: str | None,
    status: RunStatus | None,
    name_contains: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[Run]:
    """Return up to ``limit`` runs ordered by (created_at, id) descending.

    Args:
        before: Keyset position: only runs strictly before this (created_at, id) are returned.
    """
    statement = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    if project is not None:
        statement = statement.where(Run.project == project)
    if status is not None:
        statement = statement.where(Run.status == status.value)
    if name_contains is not None:
        statement = statement.where(Run.name.icontains(name_contains, autoescape=True))
    if before is not None:
        statement = statement.where(tuple_(Run.created_at, Run.id) < tuple_(*before))
    return list(session.scalars(statement))


def count_layers(session: Session, run_ids: Sequence[str]) -> dict[str, int]:
    """Return the number of layers of each run that has any."""
    statement = (
        select(Series.run_id, func.count())
        .where(Series.run_id.in_(run_ids), Series.metric == LAYER_ORDER_METRIC.value)
        .group_by(Series.run_id)
    )
    return {run_id: count for run_id, count in session.execute(statement)}


def get_run_series_states(
    session: Session, run_ids: Sequence[str], metric: Metric
) -> dict[str, SeriesState]:
    """Return the run-level series ``metric`` of each run that has it."""
    statement = select(Series.run_id, *_STATE_COLUMNS).where(
        Series.run_id.in_(run_ids), Series.metric == metric.value, Series.layer == RUN_LEVEL
    )
    return {row[0]: _to_state(row[1:]) for row in session.execute(statement)}


def get_agent_drops(session: Session, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Return the latest dropped-batch counts reported by each run's agent, by reason."""
    statement = select(AgentDrop.run_id, AgentDrop.reason, AgentDrop.count).where(
        AgentDrop.run_id.in_(run_ids)
    )
    drops: dict[str, dict[str, int]] = {}
    for run_id, reason, count in session.execute(statement):
        drops.setdefault(run_id, {})[reason] = count
    return drops


def upsert_agent_drops(
    session: Session, run_id: str, counts: Mapping[str, int], as_of_step: int
) -> None:
    """Store the agent's cumulative drop counts unless a later step already reported them.

    The caller must hold the run's lock (see :func:`get_run`) so no other writer races.
    """
    stored = {
        drop.reason: drop
        for drop in session.scalars(select(AgentDrop).where(AgentDrop.run_id == run_id))
    }
    for reason, count in counts.items():
        drop = stored.get(reason)
        if drop is None:
            session.add(AgentDrop(run_id=run_id, reason=reason, count=count, as_of_step=as_of_step))
        elif drop.as_of_step <= as_of_step:
            drop.count = count
            drop.as_of_step = as_of_step


# Batches ------------------------------------------------------------------------------------


def get_batch(session: Session, run_id: str, batch_id: str) -> BatchRecord | None:
    """Return the stored batch with this id, if any."""
    statement = select(Batch.batch_id, Batch.first_step, Batch.last_step, Batch.n_steps).where(
        Batch.run_id == run_id, Batch.batch_id == batch_id
    )
    row = session.execute(statement).first()
    return None if row is None else BatchRecord(*row)


def find_overlapping_batches(
    session: Session, run_id: str, first_step: int, last_step: int
) -> list[BatchRecord]:
    """Return the stored batches whose step range intersects ``first_step..last_step``.

    Two index range scans: stored batches never overlap, so at most one batch that starts
    before ``first_step`` can reach into the range.
    """
    columns = (Batch.batch_id, Batch.first_step, Batch.last_step, Batch.n_steps)
    inside = (
        select(*columns)
        .where(Batch.run_id == run_id, Batch.first_step.between(first_step, last_step))
        .order_by(Batch.first_step)
    )
    before = (
        select(*columns)
        .where(Batch.run_id == run_id, Batch.first_step < first_step)
        .order_by(Batch.first_step.desc())
        .limit(1)
    )
    found = [BatchRecord(*row) for row in session.execute(before)]
    overlapping = [batch for batch in found if batch.last_step >= first_step]
    overlapping.extend(BatchRecord(*row) for row in session.execute(inside))
    return overlapping


def insert_batch(session: Session, run_id: str, batch: BatchRecord, received_at: datetime) -> None:
    """Record an accepted batch."""
    session.execute(
        insert(Batch).values(
            run_id=run_id,
            batch_id=batch.batch_id,
            first_step=batch.first_step,
            last_step=batch.last_step,
            n_steps=batch.n_steps,
            received_at=received_at,
        )
    )


# Series -------------------------------------------------------------------------------------


def _to_state(columns: Sequence[Any]) -> SeriesState:
    """Build a state from the values of ``_STATE_COLUMNS``, in order."""
    return SeriesState(*columns)


def get_series_states(session: Session, run_id: str) -> dict[SeriesKey, SeriesState]:
    """Return every series of a run with its running summary, keyed by (metric, layer)."""
    statement = select(Series.metric, Series.layer, *_STATE_COLUMNS).where(Series.run_id == run_id)
    rows = session.connection().execute(statement)  # Core rows: no ORM processing per row
    return {(row[0], row[1]): _to_state(row[2:]) for row in rows}


def insert_series(session: Session, run_id: str, keys: Sequence[SeriesKey]) -> None:
    """Create empty series, in the order given (their ids increase in that order)."""
    if keys:
        session.execute(
            insert(Series),
            [
                {"run_id": run_id, "metric": metric, "layer": layer, "count": 0, "nan_count": 0}
                for metric, layer in keys
            ],
        )


def update_series_states(session: Session, states: Sequence[SeriesState]) -> None:
    """Write new running summaries, by primary key.

    PostgreSQL: one ``UPDATE ... FROM unnest(<arrays>)`` statement for all series (an
    executemany of a thousand UPDATEs costs about ten times more there). SQLite: an
    executemany, which runs in-process and is cheap.
    """
    if not states:
        return
    if session.connection().dialect.name == "postgresql":
        columns = {name: [getattr(state, name) for state in states] for name in _STATE_FIELDS}
        session.execute(_UPDATE_SERIES_FROM_ARRAYS, columns)
        return
    session.execute(
        update(Series),
        [{name: getattr(state, name) for name in _STATE_FIELDS} for state in states],
    )


_STATE_FIELDS = ("id", "count", "nan_count", "vmin", "vmax", "vsum", "last_step", "vlast")
_STATE_SQL_TYPES = ("bigint", "bigint", "bigint", "float8", "float8", "float8", "bigint", "float8")
_UPDATE_SERIES_FROM_ARRAYS = text(
    "UPDATE series SET "
    + ", ".join(f"{name} = v.{name}" for name in _STATE_FIELDS[1:])
    + " FROM unnest("
    + ", ".join(
        f"CAST(:{name} AS {kind}[])"
        for name, kind in zip(_STATE_FIELDS, _STATE_SQL_TYPES, strict=True)
    )
    + ") AS v("
    + ", ".join(_STATE_FIELDS)
    + ") WHERE series.id = v.id"
)


def find_series_id(session: Session, run_id: str, metric: Metric, layer: str) -> int | None:
    """Return the id of a series, or None if nothing was ever stored for it."""
    statement = select(Series.id).where(
        Series.run_id == run_id, Series.metric == metric.value, Series.layer == layer
    )
    return session.execute(statement).scalar_one_or_none()


def has_layer(session: Session, run_id: str, layer: str) -> bool:
    """Return whether the run has a layer with this name."""
    return find_series_id(session, run_id, LAYER_ORDER_METRIC, layer) is not None


def list_layer_stats(session: Session, run_id: str) -> list[LayerStats]:
    """Return the layers of a run in layer order (``grad_norm`` series id order)."""
    grad = (
        select(Series.layer, Series.count, Series.last_step, Series.vlast, Series.vmax)
        .where(Series.run_id == run_id, Series.metric == LAYER_ORDER_METRIC.value)
        .order_by(Series.id)
    )
    nonfinite = select(Series.layer, Series.vsum).where(
        Series.run_id == run_id, Series.metric == Metric.NONFINITE.value
    )
    totals = {
        layer: 0 if vsum is None or math.isnan(vsum) else int(vsum)
        for layer, vsum in session.execute(nonfinite)
    }
    return [
        LayerStats(name, count, last_step, vlast, vmax, totals.get(name, 0))
        for name, count, last_step, vlast, vmax in session.execute(grad)
    ]


# Blocks -------------------------------------------------------------------------------------

_BLOCK_COLUMNS = (
    Block.first_step,
    Block.last_step,
    Block.count,
    Block.vmin,
    Block.steps,
    Block.values,
)


def insert_blocks(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert block rows; keys are ``blocks`` column names.

    On PostgreSQL with psycopg 3 this is one binary ``COPY ... FROM STDIN`` on the session's
    own connection (inside its transaction); elsewhere a Core executemany (one multi-row
    ``INSERT`` per few hundred rows). Both are all-or-nothing with the transaction.
    """
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
        _copy_rows(connection, _BLOCKS, rows)
    else:
        session.execute(insert(_BLOCKS), list(rows))


def _copy_rows(connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Binary ``COPY`` of rows into ``table`` through psycopg 3 (column types from the model)."""
    dialect = connection.dialect
    quote = dialect.identifier_preparer.quote
    names = [column.name for column in table.columns]
    types = [column.type.compile(dialect=dialect).lower() for column in table.columns]
    statement = (
        f"COPY {quote(table.name)} ({', '.join(quote(name) for name in names)}) "
        "FROM STDIN (FORMAT BINARY)"
    )
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row([row[name] for name in names])


def _in_range(series_id: int, start: int | None, end: int | None) -> list[ColumnElement[bool]]:
    """Conditions selecting the blocks of a series that may hold steps in ``start..end``.

    The lower bound uses the last block starting at or before ``start`` (blocks of a series
    never overlap), so the scan is one primary-key range.
    """
    conditions = [Block.series_id == series_id]
    if start is not None:
        floor = (
            select(func.max(Block.first_step))
            .where(Block.series_id == series_id, Block.first_step <= start)
            .scalar_subquery()
        )
        conditions.append(Block.first_step >= func.coalesce(floor, start))
    if end is not None:
        conditions.append(Block.first_step <= end)
    return conditions


def fetch_blocks(
    session: Session, series_id: int, start: int | None, end: int | None
) -> list[StoredBlock]:
    """Return the blocks of a series that may hold steps in ``start..end``, by first step."""
    statement = (
        select(*_BLOCK_COLUMNS).where(*_in_range(series_id, start, end)).order_by(Block.first_step)
    )
    return [StoredBlock(*row) for row in session.execute(statement)]


_SUMMARY_COLUMNS = (
    Block.first_step,
    Block.last_step,
    Block.count,
    Block.nan_count,
    Block.vmin,
    Block.vmax,
    Block.vlast,
)


def fetch_block_summaries(
    session: Session,
    series_id: int,
    start: int | None,
    end: int | None,
    *,
    limit: int | None = None,
) -> BlockSummaries:
    """Return the summary columns (no blobs) of the blocks that may hold ``start..end``.

    Args:
        limit: Return at most this many blocks (the first ones).
    """
    statement = (
        select(*_SUMMARY_COLUMNS)
        .where(*_in_range(series_id, start, end))
        .order_by(Block.first_step)
    )
    if limit is not None:
        statement = statement.limit(limit)
    # Core execution on the session's connection: ORM row processing costs ~4 µs per row.
    return _summaries_of(session.connection().execute(statement).all())


def _summaries_of(rows: Sequence[Any]) -> BlockSummaries:
    """Columns (first, last, count, nan_count, vmin, vmax, vlast) of rows → arrays."""
    columns: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [()] * 7
    first_step, last_step, count, nan_count = (
        np.array(column, dtype=np.int64) for column in columns[:4]
    )
    # None (SQL NULL) becomes NaN in a float array.
    vmin, vmax, vlast = (np.array(column, dtype=np.float64) for column in columns[4:])
    return BlockSummaries(first_step, last_step, count, nan_count, vmin, vmax, vlast)


def count_inner_blocks(session: Session, series_id: int, lo: int, hi: int) -> tuple[int, int, int]:
    """Return (values, first step, last step) of the blocks lying wholly inside ``lo..hi``.

    One aggregate over a primary-key range, no blobs read into Python. The steps are
    meaningless when the count is 0.
    """
    statement = select(
        func.coalesce(func.sum(Block.count), 0),
        func.coalesce(func.min(Block.first_step), 0),
        func.coalesce(func.max(Block.last_step), 0),
    ).where(*_inside(series_id, lo, hi))
    count, first, last = session.connection().execute(statement).one()
    return int(count), int(first), int(last)


def fetch_cut_blocks(session: Session, series_id: int, lo: int, hi: int) -> list[StoredBlock]:
    """Return the (at most two) blocks holding steps on both sides of ``lo`` or of ``hi``.

    Blocks never overlap, so only the last block starting before ``lo`` and the last block
    starting at or before ``hi`` can be cut; two primary-key probes.
    """

    def last_start(condition: ColumnElement[bool]) -> Any:
        return (
            select(func.max(Block.first_step))
            .where(Block.series_id == series_id, condition)
            .scalar_subquery()
        )

    statement = (
        select(*_BLOCK_COLUMNS)
        .where(
            Block.series_id == series_id,
            Block.first_step.in_(
                [last_start(Block.first_step < lo), last_start(Block.first_step <= hi)]
            ),
            or_(
                and_(Block.first_step < lo, Block.last_step >= lo),
                and_(Block.first_step <= hi, Block.last_step > hi),
            ),
        )
        .order_by(Block.first_step)
    )
    return [StoredBlock(*row) for row in session.execute(statement)]


def _inside(series_id: int, lo: int, hi: int) -> list[ColumnElement[bool]]:
    """Blocks wholly inside ``lo..hi`` (``first_step <= hi`` keeps the scan a key range)."""
    return [
        Block.series_id == series_id,
        Block.first_step >= lo,
        Block.first_step <= hi,
        Block.last_step <= hi,
    ]


def bucket_inner_blocks(
    session: Session, series_id: int, lo: int, hi: int, origin: int, width: int
) -> BlockSummaries:
    """Aggregate, in SQL, the blocks inside ``lo..hi`` that fit in one bucket, per bucket.

    Bucket ``b`` holds steps ``origin + b·width .. origin + (b+1)·width - 1``. Each row
    returned is one bucket: first and last step, summed counts, min of ``vmin``, max of
    ``vmax`` (SQL's min/max skip NULL, i.e. all-NaN blocks) and the ``vlast`` of its last
    block (found by primary key). At most one row per bucket reaches Python.
    """
    first_bucket = (Block.first_step - origin) // width
    last_bucket = (Block.last_step - origin) // width
    grouped = (
        select(
            first_bucket.label("bucket"),
            func.min(Block.first_step).label("first_step"),
            func.max(Block.first_step).label("last_first_step"),
            func.max(Block.last_step).label("last_step"),
            func.sum(Block.count).label("count"),
            func.sum(Block.nan_count).label("nan_count"),
            func.min(Block.vmin).label("vmin"),
            func.max(Block.vmax).label("vmax"),
        )
        .where(*_inside(series_id, lo, hi), first_bucket == last_bucket)
        .group_by(first_bucket)
        .subquery()
    )
    last_block = aliased(Block)
    statement = (
        select(
            grouped.c.first_step,
            grouped.c.last_step,
            grouped.c.count,
            grouped.c.nan_count,
            grouped.c.vmin,
            grouped.c.vmax,
            last_block.vlast,
        )
        .join(
            last_block,
            and_(
                last_block.series_id == series_id,
                last_block.first_step == grouped.c.last_first_step,
            ),
        )
        .order_by(grouped.c.first_step)
    )
    return _summaries_of(session.connection().execute(statement).all())


def fetch_split_blocks(
    session: Session, series_id: int, lo: int, hi: int, origin: int, width: int
) -> list[StoredBlock]:
    """Return the blocks inside ``lo..hi`` that cross a bucket edge (see
    :func:`bucket_inner_blocks`), with their packed values, by first step."""
    statement = (
        select(*_BLOCK_COLUMNS)
        .where(
            *_inside(series_id, lo, hi),
            (Block.first_step - origin) // width != (Block.last_step - origin) // width,
        )
        .order_by(Block.first_step)
    )
    return [StoredBlock(*row) for row in session.execute(statement)]


# Prometheus scrape (a constant number of queries, whatever the number of runs) --------------


def _exported(finished_since: datetime, ingested_since: datetime) -> ColumnElement[bool]:
    """Runs still exported: running ones that ingested (or were created) recently, and
    finished or failed ones within their grace period."""
    return or_(
        and_(
            Run.status == RunStatus.RUNNING.value,
            func.coalesce(Run.last_ingest_at, Run.created_at) >= ingested_since,
        ),
        Run.updated_at >= finished_since,
    )


def scrape_runs(
    session: Session, *, finished_since: datetime, ingested_since: datetime
) -> list[RunScrape]:
    """Return the exported columns of every exported run (see ``_exported``), with its last
    global norm (before and after clipping) and loss.

    One query: ``runs`` left-joined three times to ``series`` on the full unique key, so each
    run costs three index probes.
    """
    global_norm = aliased(Series)
    clipped = aliased(Series)
    loss = aliased(Series)

    def run_level(series: type[Series], metric: Metric) -> ColumnElement[bool]:
        return and_(
            series.run_id == Run.id, series.metric == metric.value, series.layer == RUN_LEVEL
        )

    statement = (
        select(
            Run.id,
            Run.project,
            Run.name,
            Run.status,
            Run.last_step,
            Run.last_ingest_at,
            Run.clipped_steps,
            Run.skipped_steps,
            Run.nonfinite_values,
            Run.num_steps,
            Run.norm_window_max,
            Run.norm_window_previous_max,
            global_norm.last_step,
            global_norm.vlast,
            clipped.last_step,
            clipped.vlast,
            loss.last_step,
            loss.vlast,
            Run.top_layers,
        )
        .outerjoin(global_norm, run_level(global_norm, Metric.GLOBAL_NORM))
        .outerjoin(clipped, run_level(clipped, Metric.GLOBAL_NORM_CLIPPED))
        .outerjoin(loss, run_level(loss, Metric.LOSS))
        .where(_exported(finished_since, ingested_since))
        .order_by(Run.created_at, Run.id)
    )
    return [RunScrape(*tuple(row)) for row in session.execute(statement)]


def scrape_agent_drops(
    session: Session, *, finished_since: datetime, ingested_since: datetime
) -> list[tuple[str, str, int]]:
    """Return (run_id, reason, count) for every agent drop count of an exported run."""
    statement = (
        select(AgentDrop.run_id, AgentDrop.reason, AgentDrop.count)
        .join(Run, Run.id == AgentDrop.run_id)
        .where(_exported(finished_since, ingested_since))
        .order_by(AgentDrop.run_id, AgentDrop.reason)
    )
    return [(run_id, reason, count) for run_id, reason, count in session.execute(statement)]


def scrape_detector_counts(
    session: Session, *, finished_since: datetime, ingested_since: datetime
) -> list[tuple[str, str, str, int]]:
    """Return (run_id, rule, severity, count) for every detection count of an exported run."""
    statement = (
        select(
            DetectorCount.run_id, DetectorCount.rule, DetectorCount.severity, DetectorCount.count
        )
        .join(Run, Run.id == DetectorCount.run_id)
        .where(_exported(finished_since, ingested_since))
    )
    return [tuple(row) for row in session.execute(statement)]  # type: ignore[misc]


# Detectors ----------------------------------------------------------------------------------


def get_project_detectors(session: Session, project: str) -> dict[str, Any] | None:
    """Return a project's stored detector configuration (JSON), or None when it has none."""
    statement = select(ProjectSettings.detectors).where(ProjectSettings.project == project)
    return session.execute(statement).scalar_one_or_none()


def put_project_detectors(
    session: Session, project: str, detectors: dict[str, Any], now: datetime
) -> None:
    """Store a project's detector configuration, replacing any earlier one."""
    stored = session.get(ProjectSettings, project, with_for_update=True)
    if stored is None:
        session.add(ProjectSettings(project=project, detectors=detectors, updated_at=now))
    else:
        stored.detectors = detectors
        stored.updated_at = now


def get_detector_state(session: Session, run_id: str) -> bytes | None:
    """Return a run's serialised detector state, or None before its first batch."""
    statement = select(DetectorState.state).where(DetectorState.run_id == run_id)
    return session.execute(statement).scalar_one_or_none()


def put_detector_state(session: Session, run_id: str, state: bytes, now: datetime) -> None:
    """Store a run's detector state. The caller must hold the run's lock."""
    stored = session.get(DetectorState, run_id)
    if stored is None:
        session.add(DetectorState(run_id=run_id, state=state, updated_at=now))
    else:
        stored.state = state
        stored.updated_at = now


def get_latest_events(
    session: Session, run_id: str, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Event]:
    """Return the latest stored event of each (rule, layer) in ``keys`` that has one."""
    if not keys:
        return {}
    latest = (
        select(func.max(Event.id))
        .where(Event.run_id == run_id, tuple_(Event.rule, Event.layer).in_(list(keys)))
        .group_by(Event.rule, Event.layer)
    )
    events = session.scalars(select(Event).where(Event.id.in_(latest)))
    return {(event.rule, event.layer): event for event in events}


def add_detector_counts(
    session: Session, run_id: str, counts: Mapping[tuple[str, str], int]
) -> None:
    """Add detections to a run's (rule, severity) counters. The caller holds the run's lock."""
    if not counts:
        return
    stored = {
        (row.rule, row.severity): row
        for row in session.scalars(select(DetectorCount).where(DetectorCount.run_id == run_id))
    }
    for (rule, severity), count in counts.items():
        row = stored.get((rule, severity))
        if row is None:
            session.add(DetectorCount(run_id=run_id, rule=rule, severity=severity, count=count))
        else:
            row.count += count


def get_detector_counts(session: Session, run_id: str) -> dict[tuple[str, str], int]:
    """Return a run's detection counts by (rule, severity)."""
    statement = select(DetectorCount.rule, DetectorCount.severity, DetectorCount.count).where(
        DetectorCount.run_id == run_id
    )
    return {(rule, severity): count for rule, severity, count in session.execute(statement)}


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events of a run to list; None fields do not filter."""

    rules: Sequence[str] | None = None
    severities: Sequence[str] | None = None
    layer: str | None = None
    start: int | None = None
    """Only events that reach this step or later."""
    end: int | None = None
    """Only events that start at this step or earlier."""


EventCursor = tuple[int, int]
"""Keyset position (first_step, id) of the last event of a page."""


def list_events(
    session: Session, run_id: str, where: EventFilter, after: EventCursor | None, limit: int
) -> list[Event]:
    """Return up to ``limit`` events of a run, newest first (by first step, then id)."""
    statement = (
        select(Event)
        .where(Event.run_id == run_id)
        .order_by(Event.first_step.desc(), Event.id.desc())
        .limit(limit)
    )
    if where.rules:
        statement = statement.where(Event.rule.in_(where.rules))
    if where.severities:
        statement = statement.where(Event.severity.in_(where.severities))
    if where.layer is not None:
        statement = statement.where(Event.layer == where.layer)
    if where.start is not None:
        statement = statement.where(Event.last_step >= where.start)
    if where.end is not None:
        statement = statement.where(Event.first_step <= where.end)
    if after is not None:
        statement = statement.where(tuple_(Event.first_step, Event.id) < tuple_(*after))
    return list(session.scalars(statement))


def summarise_event_layers(
    session: Session, run_id: str, limit: int
) -> list[tuple[str, int, int, str]]:
    """Return the layers with the most detections: (layer, detections, events, worst severity).

    Run-level events (``layer == ''``) are left out. Ordered by detections, most first. The
    severity is the stored spelling (``"critical"`` or ``"warning"``).
    """
    critical = func.max(case((Event.severity == _CRITICAL, 1), else_=0))
    detections = func.sum(Event.count)
    statement = (
        select(Event.layer, detections, func.count(), critical)
        .where(Event.run_id == run_id, Event.layer != RUN_LEVEL)
        .group_by(Event.layer)
        .order_by(detections.desc(), Event.layer)
        .limit(limit)
    )
    return [
        (layer, int(total), int(events), _CRITICAL if worst else _WARNING)
        for layer, total, events, worst in session.execute(statement)
    ]
