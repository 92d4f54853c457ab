"""SQL of the series aggregate: series rows, packed blocks and bucket queries (the running
summaries are read and written as arrays by :mod:`.summary`).

Session contract as in :mod:`gradwatch.server.store` (caller owns the transaction; blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import (
    ColumnElement,
    SQLColumnExpression,
    Table,
    and_,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, aliased

from gradwatch.wire import MAX_STEP

from .block import BlockSet, BlockSummaries, StoredBlock
from .metric import LAYER_ORDER_METRIC, Metric
from .models import RUN_LEVEL, Block, Series
from .summary import nullable

__all__ = [
    "BLOCK_COLUMNS",
    "LayerStats",
    "SeriesKey",
    "SeriesState",
    "bucket_inner_blocks",
    "bucket_of",
    "count_inner_blocks",
    "fetch_block_summaries",
    "fetch_blocks",
    "fetch_cut_blocks",
    "fetch_split_blocks",
    "find_series_id",
    "get_run_series_states",
    "has_layer",
    "insert_blocks",
    "insert_series",
    "list_layer_latest",
    "list_layer_stats",
]


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
class LayerStats:
    """Summary of a layer's ``grad_norm`` series plus its non-finite value total."""

    name: str
    count: int
    last_step: int | None
    vlast: float | None
    vmax: float | None
    nonfinite_values: int


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


# Series -------------------------------------------------------------------------------------


def _to_state(columns: Sequence[Any]) -> SeriesState:
    """Build a state from the values of ``_STATE_COLUMNS``, in order."""
    return SeriesState(*columns)


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


def list_layer_latest(
    session: Session, run_id: str, metric: Metric
) -> dict[str, tuple[int | None, float | None]]:
    """Return ``(last_step, vlast)`` of one per-layer metric for every layer that has it."""
    statement = select(Series.layer, Series.last_step, Series.vlast).where(
        Series.run_id == run_id, Series.metric == metric.value
    )
    return {layer: (last_step, vlast) for layer, last_step, vlast in session.execute(statement)}


# Blocks -------------------------------------------------------------------------------------

BLOCK_COLUMNS = (  # what a StoredBlock is read from
    Block.first_step,
    Block.last_step,
    Block.count,
    Block.vmin,
    Block.steps,
    Block.values,
)


def insert_blocks(session: Session, series_id: NDArray[np.int64], blocks: BlockSet) -> None:
    """Insert one block row per series: ``blocks`` entry ``j`` belongs to ``series_id[j]``.

    Every block must hold a value (``count > 0``). The rows are built column-wise in one go
    (NaN summaries as NULL, see ``models.Block``). On PostgreSQL with psycopg 3 they go in with
    one binary ``COPY ... FROM STDIN`` on the session's own connection (inside its
    transaction); on SQLite with one executemany straight to the driver (SQLAlchemy's per-row
    parameter processing cost more than SQLite's inserts); elsewhere a Core executemany. All
    are all-or-nothing with the transaction. Blocks on the database.
    """
    if not len(series_id):
        return
    columns: dict[str, Sequence[Any]] = {
        "series_id": series_id.tolist(),
        "first_step": blocks.first_step.tolist(),
        "last_step": blocks.last_step.tolist(),
        "count": blocks.count.tolist(),
        "nan_count": blocks.nan_count.tolist(),
        "vmin": nullable(blocks.vmin),
        "vmax": nullable(blocks.vmax),
        "vlast": nullable(blocks.vlast),
        "steps": blocks.steps,
        "values": blocks.values,
    }
    names = [column.name for column in _BLOCKS.columns]
    rows = list(zip(*(columns[name] for name in names), strict=True))
    connection = session.connection()
    if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
        _copy_rows(connection, _BLOCKS, names, rows)
    elif connection.dialect.name == "sqlite":
        quote = connection.dialect.identifier_preparer.quote
        statement = (
            f"INSERT INTO {quote(_BLOCKS.name)} ({', '.join(quote(name) for name in names)}) "
            f"VALUES ({', '.join('?' for _ in names)})"
        )
        connection.exec_driver_sql(statement, rows)
    else:
        session.execute(insert(_BLOCKS), [dict(zip(names, row, strict=True)) for row in rows])


def _copy_rows(
    connection: Connection, table: Table, names: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Binary ``COPY`` of rows (values in ``names`` order) into ``table`` through psycopg 3
    (column types from the model)."""
    dialect = connection.dialect
    quote = dialect.identifier_preparer.quote
    types = [table.columns[name].type.compile(dialect=dialect).lower() for name in names]
    statement = (
        f"COPY {quote(table.name)} ({', '.join(quote(name) for name in names)}) "
        "FROM STDIN (FORMAT BINARY)"
    )
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


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
        select(*BLOCK_COLUMNS).where(*_in_range(series_id, start, end)).order_by(Block.first_step)
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
        select(*BLOCK_COLUMNS)
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


def bucket_of(step: SQLColumnExpression[int], origin: int, width: int) -> ColumnElement[int]:
    """SQL bucket index of ``step`` (≥ ``origin``) for buckets of ``width`` steps from ``origin``.

    Every offset ``step - origin`` fits int64 (steps are 0..``MAX_STEP``), but ``width`` need
    not: one bucket over every possible step is 2⁶³ wide, one more than a ``bigint`` parameter
    can hold. Such a width puts every step in bucket 0, written as ``step - step`` so the
    expression still depends on the row (a bare constant in ``GROUP BY`` is a column position
    on PostgreSQL) and no out-of-range number is bound.
    """
    if width > MAX_STEP:
        return step - step
    return (step - origin) // width


def bucket_inner_blocks(
    session: Session, series_id: int, lo: int, hi: int, origin: int, width: int
) -> BlockSummaries:
    """Aggregate, in SQL, the blocks inside ``lo..hi`` that fit in one bucket, per bucket.

    Bucket ``b`` holds steps ``origin + b·width .. origin + (b+1)·width - 1``. Each row
    returned is one bucket: first and last step, summed counts, min of ``vmin``, max of
    ``vmax`` (SQL's min/max skip NULL, i.e. all-NaN blocks) and the ``vlast`` of its last
    block (found by primary key). At most one row per bucket reaches Python.
    """
    first_bucket = bucket_of(Block.first_step, origin, width)
    last_bucket = bucket_of(Block.last_step, origin, width)
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
        select(*BLOCK_COLUMNS)
        .where(
            *_inside(series_id, lo, hi),
            bucket_of(Block.first_step, origin, width) != bucket_of(Block.last_step, origin, width),
        )
        .order_by(Block.first_step)
    )
    return [StoredBlock(*row) for row in session.execute(statement)]


def get_run_series_states(
    session: Session, run_ids: Sequence[str], metric: Metric
) -> dict[str, SeriesState]:
    """Return the run-level series ``metric`` of each run that has it."""
    statement = select(Series.run_id, *_STATE_COLUMNS).where(
        Series.run_id.in_(run_ids), Series.metric == metric.value, Series.layer == RUN_LEVEL
    )
    return {row[0]: _to_state(row[1:]) for row in session.execute(statement)}
