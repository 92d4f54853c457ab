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

from sqlalchemy import ColumnElement, Table, and_, func, insert, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from gradwatch.server.block import StoredBlock
from gradwatch.server.metric import LAYER_ORDER_METRIC, Metric
from gradwatch.server.models import AgentDrop, Batch, Block, Run, RunStatus, Series

__all__ = [
    "RUN_LEVEL",
    "BatchRecord",
    "LayerStats",
    "RunScrape",
    "SeriesKey",
    "SeriesState",
    "count_layers",
    "fetch_blocks",
    "find_overlapping_batches",
    "find_series_id",
    "get_agent_drops",
    "get_batch",
    "get_run",
    "get_run_series_states",
    "get_series_states",
    "has_layer",
    "insert_batch",
    "insert_blocks",
    "insert_series",
    "list_layer_stats",
    "list_runs",
    "scrape_agent_drops",
    "scrape_runs",
    "update_series_states",
    "upsert_agent_drops",
]

RUN_LEVEL = ""
"""The ``series.layer`` value of run-level metrics."""

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
    global_norm_last_step: int | None
    global_norm_last: float | None
    """Global norm at ``global_norm_last_step``; NULL means NaN."""
    loss_last_step: int | None
    loss_last: float | None
    """Loss at ``loss_last_step``; NULL means NaN."""


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
    return {(row[0], row[1]): _to_state(row[2:]) for row in session.execute(statement)}


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
    """Write new running summaries (one executemany UPDATE by primary key)."""
    if states:
        session.execute(
            update(Series),
            [
                {
                    "id": state.id,
                    "count": state.count,
                    "nan_count": state.nan_count,
                    "vmin": state.vmin,
                    "vmax": state.vmax,
                    "vsum": state.vsum,
                    "last_step": state.last_step,
                    "vlast": state.vlast,
                }
                for state in states
            ],
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
    """Insert block rows (Core executemany; keys are ``blocks`` column names)."""
    if rows:
        session.execute(insert(_BLOCKS), list(rows))


def fetch_blocks(
    session: Session, series_id: int, start: int | None, end: int | None
) -> list[StoredBlock]:
    """Return the blocks of a series that may hold steps in ``start..end``, by first step.

    The lower bound uses the last block starting at or before ``start`` (blocks of a series
    never overlap), so the scan is one primary-key range.
    """
    statement = select(*_BLOCK_COLUMNS).where(Block.series_id == series_id)
    if start is not None:
        floor = (
            select(func.max(Block.first_step))
            .where(Block.series_id == series_id, Block.first_step <= start)
            .scalar_subquery()
        )
        statement = statement.where(Block.first_step >= func.coalesce(floor, start))
    if end is not None:
        statement = statement.where(Block.first_step <= end)
    statement = statement.order_by(Block.first_step)
    return [StoredBlock(*row) for row in session.execute(statement)]


# Prometheus scrape (a constant number of queries, whatever the number of runs) --------------


def scrape_runs(session: Session) -> list[RunScrape]:
    """Return the exported columns of every run, with its last global norm and loss.

    One query: ``runs`` left-joined twice to ``series`` on the full unique key, so each run
    costs two index probes.
    """
    global_norm = aliased(Series)
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
            global_norm.last_step,
            global_norm.vlast,
            loss.last_step,
            loss.vlast,
        )
        .outerjoin(global_norm, run_level(global_norm, Metric.GLOBAL_NORM))
        .outerjoin(loss, run_level(loss, Metric.LOSS))
        .order_by(Run.created_at, Run.id)
    )
    return [RunScrape(*tuple(row)) for row in session.execute(statement)]


def scrape_agent_drops(session: Session) -> list[tuple[str, str, int]]:
    """Return (run_id, reason, count) for every stored agent drop count."""
    statement = select(AgentDrop.run_id, AgentDrop.reason, AgentDrop.count).order_by(
        AgentDrop.run_id, AgentDrop.reason
    )
    return list(session.execute(statement))
