"""Retention: delete old finished runs entirely, in small transactions.

A run is *prunable* when its status is ``finished`` or ``failed`` and its last activity
(``runs.updated_at``: creation, the last ingested batch or the last status change) is older
than the cut. Pruning deletes the whole run: its blocks, rollups, events, idempotency
records, series, detector state and counts, agent drop counts and finally the run row, so
the space is freed and the run is gone from every list. Running runs are never touched,
however old.

Deletes are bounded: each transaction removes at most ``chunk_rows`` rows of one table, cut at
a primary-key boundary (the ``chunk_rows``-th key in key order), so no lock is held for long
and ingest into other runs goes on between chunks (SQLite: each chunk takes the write lock
briefly; PostgreSQL: row locks only). The run row goes last, so an interrupted prune leaves
a run that is still listed with part of its samples; the next prune (its status and
``updated_at`` are untouched) finishes it. A batch that arrives for a run while it is being
pruned is deleted with it; after the run row is gone its agent gets 404.

Unlike the repository modules, :func:`prune_runs` owns its transactions (one per chunk);
:func:`find_prunable_runs` and :func:`measure_runs` follow the package's session contract.
Everything blocks on the database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Result, and_, delete, func, select, text, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from .db import Database
from .models import (
    AgentDrop,
    Base,
    Batch,
    Block,
    DetectorCount,
    DetectorState,
    Event,
    Incident,
    Rollup,
    Run,
    RunStatus,
    Series,
)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "PRUNABLE_STATUSES",
    "TABLES",
    "PruneReport",
    "SqliteSpace",
    "find_prunable_runs",
    "measure_runs",
    "prune_runs",
    "sqlite_space",
    "vacuum_sqlite",
]

DEFAULT_CHUNK_ROWS = 2000
"""Rows one prune transaction deletes at most: a few milliseconds of lock per chunk."""

PRUNABLE_STATUSES: tuple[str, ...] = (RunStatus.FINISHED.value, RunStatus.FAILED.value)

_LOCK_KEY = 0x67726164_70727565
"""PostgreSQL advisory lock held by a prune pass ("gradprue"), so two never interleave."""

_Key = Sequence[InstrumentedAttribute[Any]]


@dataclass(frozen=True, slots=True)
class _Part:
    """One table of a run: its model, the rows of the run and the key deletes are cut on."""

    model: type[Base]
    key: _Key

    @property
    def table(self) -> str:
        return str(self.model.__tablename__)

    def of_run(self, run_id: str) -> ColumnElement[bool]:
        if self.model is Block:
            return Block.series_id.in_(select(Series.id).where(Series.run_id == run_id))
        column: InstrumentedAttribute[str] = self.model.run_id  # type: ignore[attr-defined]
        return column == run_id


_PARTS: tuple[_Part, ...] = (
    # Children before parents: blocks before their series, everything before the run.
    # Each key follows an index that starts with the run (blocks: the series) so every
    # boundary lookup and delete is a range scan of that index. Blocks are cut per series
    # (_delete_blocks_chunk); their key here serves measure_runs only.
    _Part(Block, (Block.series_id, Block.first_step)),
    _Part(Rollup, (Rollup.metric, Rollup.chunk)),
    _Part(Event, (Event.first_step, Event.id)),
    _Part(Batch, (Batch.batch_id,)),
    _Part(Series, (Series.metric, Series.layer)),
    _Part(DetectorState, (DetectorState.run_id,)),
    _Part(DetectorCount, (DetectorCount.rule, DetectorCount.severity)),
    _Part(AgentDrop, (AgentDrop.reason,)),
    _Part(Incident, (Incident.step,)),
)

TABLES: tuple[str, ...] = (*(part.table for part in _PARTS), "runs")
"""Every table holding rows of a run, in the order a prune empties them."""


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune deleted (or, for a dry run, would delete).

    Attributes:
        run_ids: The runs deleted completely, oldest activity first.
        rows: Rows deleted per table (every table of :data:`TABLES`, zeros included).
        sample_bytes: Bytes of packed steps and values in the deleted blocks (the bulk of a
            run's size; keys, summaries and indexes come on top).
        dry_run: Nothing was deleted; the figures are what a real prune would delete now.
        stopped: The pass was asked to stop before it finished; ``run_ids`` lists only the
            runs completed, and the rows of a run left half-pruned are counted in ``rows``.
    """

    run_ids: tuple[str, ...]
    rows: dict[str, int] = field(default_factory=dict)
    sample_bytes: int = 0
    dry_run: bool = False
    stopped: bool = False


@dataclass(frozen=True, slots=True)
class SqliteSpace:
    """Size of a SQLite database file and the free pages inside it, in bytes.

    Free pages are reused by new rows; only ``VACUUM`` gives them back to the file system.
    """

    file_bytes: int
    free_bytes: int


def _prunable(cutoff: datetime) -> ColumnElement[bool]:
    return and_(Run.status.in_(PRUNABLE_STATUSES), Run.updated_at < cutoff)


def find_prunable_runs(session: Session, cutoff: datetime) -> list[str]:
    """Return the ids of the finished or failed runs last active before ``cutoff``.

    Oldest activity first. ``cutoff`` must be timezone-aware.
    """
    statement = select(Run.id).where(_prunable(cutoff)).order_by(Run.updated_at, Run.id)
    return list(session.scalars(statement))


def _sample_bytes(where: ColumnElement[bool]) -> Any:
    size = func.coalesce(func.length(Block.steps), 0) + func.coalesce(func.length(Block.values), 0)
    return select(func.coalesce(func.sum(size), 0)).where(where)


def measure_runs(session: Session, run_ids: Sequence[str]) -> tuple[dict[str, int], int]:
    """Count the rows of ``run_ids`` in every table, and the packed bytes of their blocks.

    Reads every block of the runs (no sample is decoded). Returns ``(rows per table,
    sample bytes)``.
    """
    rows = dict.fromkeys(TABLES, 0)
    sample_bytes = 0
    for run_id in run_ids:
        for part in _PARTS:
            where = part.of_run(run_id)
            rows[part.table] += int(
                session.execute(
                    select(func.count()).select_from(part.model).where(where)
                ).scalar_one()
            )
            if part.model is Block:
                sample_bytes += int(session.execute(_sample_bytes(where)).scalar_one())
        rows["runs"] += 1
    return rows, sample_bytes


def _delete_chunk(session: Session, part: _Part, run_id: str, chunk_rows: int) -> tuple[int, bool]:
    """Delete up to ``chunk_rows`` rows of one run from one table (not blocks), in key order.

    Returns ``(rows deleted, whether the table holds no more rows of the run)``. Both
    statements are range scans of an index on (run_id, key...), cut at the
    ``chunk_rows``-th key.
    """
    where = part.of_run(run_id)
    boundary = session.execute(
        select(*part.key).where(where).order_by(*part.key).offset(chunk_rows - 1).limit(1)
    ).first()
    if boundary is not None:
        if len(part.key) == 1:
            where = and_(where, part.key[0] <= boundary[0])
        else:
            where = and_(where, tuple_(*part.key) <= tuple_(*boundary))
    result = session.execute(
        delete(part.model).where(where).execution_options(synchronize_session=False)
    )
    return _rowcount(result), boundary is None


def _rowcount(result: Result[Any]) -> int:
    """Rows a DELETE removed (``Session.execute`` types its result as a plain Result)."""
    return int(cast(CursorResult[Any], result).rowcount)


def _delete_blocks_chunk(
    session: Session, series_ids: list[int], chunk_rows: int
) -> tuple[int, int]:
    """Delete up to ``chunk_rows`` blocks of the series at the head of ``series_ids``.

    Series are emptied in order, several small ones per call; a series is popped from the
    list once a boundary lookup finds it holds no more than the rows left to delete. Each
    lookup and delete is a range scan of the primary key (series_id, first_step), so the cost
    of a chunk does not grow with the size of the run. Returns ``(rows, sample bytes)``.
    """
    deleted = sample_bytes = 0
    while series_ids and deleted < chunk_rows:
        where = Block.series_id == series_ids[0]
        boundary = session.execute(
            select(Block.first_step)
            .where(where)
            .order_by(Block.first_step)
            .offset(chunk_rows - deleted - 1)
            .limit(1)
        ).scalar_one_or_none()
        if boundary is None:
            series_ids.pop(0)
        else:
            where = and_(where, Block.first_step <= boundary)
        sample_bytes += int(session.execute(_sample_bytes(where)).scalar_one())
        deleted += _rowcount(
            session.execute(delete(Block).where(where).execution_options(synchronize_session=False))
        )
    return deleted, sample_bytes


def prune_runs(
    database: Database,
    cutoff: datetime,
    *,
    dry_run: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    wait_for_other_prune: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> PruneReport | None:
    """Delete every finished or failed run last active before ``cutoff``, chunk by chunk.

    Each chunk is its own write transaction of at most ``chunk_rows`` rows (see the module
    docstring); a run is re-checked just before its first chunk, so one that became active
    again (a late batch, a status set back to running) since the runs were listed is kept.
    Blocks until done; safe to call from any thread, and from several processes at once (on
    PostgreSQL one pass at a time holds an advisory lock, on SQLite chunks serialise on the
    write lock).

    Args:
        database: The database.
        cutoff: Timezone-aware time; runs last active strictly before it go.
        dry_run: Only measure what would go (:func:`measure_runs`); delete nothing.
        chunk_rows: Most rows deleted per transaction (≥ 1).
        wait_for_other_prune: On PostgreSQL, wait for another prune pass to end; when False,
            return None at once if one holds the lock.
        should_stop: Called between chunks; when it returns True the pass ends early with
            ``stopped`` set (a half-pruned run is finished by the next pass).

    Returns:
        What was deleted, or None when another pass held the lock and
        ``wait_for_other_prune`` was False.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if dry_run:
        with database.read_session() as session:
            run_ids = find_prunable_runs(session, cutoff)
            rows, sample_bytes = measure_runs(session, run_ids)
        return PruneReport(tuple(run_ids), rows, sample_bytes, dry_run=True)
    with _pass_lock(database, wait=wait_for_other_prune) as acquired:
        if not acquired:
            return None
        return _prune(database, cutoff, chunk_rows, should_stop)


def _prune(
    database: Database, cutoff: datetime, chunk_rows: int, should_stop: Callable[[], bool]
) -> PruneReport:
    with database.read_session() as session:
        candidates = find_prunable_runs(session, cutoff)
    rows = dict.fromkeys(TABLES, 0)
    sample_bytes = 0
    done: list[str] = []

    def stopped() -> PruneReport:
        return PruneReport(tuple(done), rows, sample_bytes, stopped=True)

    for run_id in candidates:
        if should_stop():
            return stopped()
        with database.read_session() as session:
            if session.execute(select(Run.id).where(Run.id == run_id, _prunable(cutoff))).first():
                series_ids = list(
                    session.scalars(
                        select(Series.id).where(Series.run_id == run_id).order_by(Series.id)
                    )
                )
            else:
                continue  # active again since it was listed: keep it
        while series_ids:  # ends: each chunk deletes chunk_rows blocks or pops a series
            if should_stop():
                return stopped()
            with database.write_session() as session:
                deleted, freed = _delete_blocks_chunk(session, series_ids, chunk_rows)
                session.commit()
            rows["blocks"] += deleted
            sample_bytes += freed
        for part in _PARTS[1:]:  # every table but blocks (first), cut per run
            finished = False
            while not finished:  # ends: each chunk deletes chunk_rows rows, or the last ones
                if should_stop():
                    return stopped()
                with database.write_session() as session:
                    deleted, finished = _delete_chunk(session, part, run_id, chunk_rows)
                    session.commit()
                rows[part.table] += deleted
        with database.write_session() as session:
            # Cascades to any row a late batch added since its table was emptied.
            deleted = _rowcount(
                session.execute(
                    delete(Run).where(Run.id == run_id).execution_options(synchronize_session=False)
                )
            )
            session.commit()
        if deleted:  # 0: another process's pass deleted it first
            rows["runs"] += deleted
            done.append(run_id)
    return PruneReport(tuple(done), rows, sample_bytes)


@contextmanager
def _pass_lock(database: Database, *, wait: bool) -> Iterator[bool]:
    """Hold PostgreSQL's prune advisory lock for a pass; yields whether it is held.

    A no-op (yielding True) on other databases. The lock is session-level, on a connection of
    its own in autocommit mode, so it never keeps a transaction or a snapshot open while the
    chunks run; it is released on exit, or by the server if the connection dies.
    """
    engine = database.engine
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        function = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        acquired = connection.execute(
            text(f"SELECT {function}(:key)"), {"key": _LOCK_KEY}
        ).scalar_one()
        if acquired is False:
            yield False
            return
        try:
            yield True
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})


def sqlite_space(database: Database) -> SqliteSpace | None:
    """Return the SQLite file's size and free space, or None on other databases.

    Two pragma reads; does not block on writers (WAL).
    """
    if database.engine.dialect.name != "sqlite":
        return None
    with database.engine.connect() as connection:
        page_size = int(connection.exec_driver_sql("PRAGMA page_size").scalar_one())
        pages = int(connection.exec_driver_sql("PRAGMA page_count").scalar_one())
        free = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar_one())
    return SqliteSpace(file_bytes=pages * page_size, free_bytes=free * page_size)


def vacuum_sqlite(database: Database) -> None:
    """Rewrite a SQLite database without its free pages (``VACUUM``), shrinking the file.

    Takes the database's exclusive lock for the whole rewrite (seconds per GiB): writers
    wait, up to their busy timeout, and fail after it; it needs free disk space about the
    size of the file. Blocks until done.

    Raises:
        ValueError: The database is not SQLite.
    """
    if database.engine.dialect.name != "sqlite":
        raise ValueError("VACUUM here is for SQLite; PostgreSQL's autovacuum reuses the space")
    connection = database.engine.raw_connection()
    try:
        # The connect hook set isolation_level None: VACUUM runs outside any transaction.
        cursor = connection.cursor()
        try:
            cursor.execute("VACUUM")
        finally:
            cursor.close()
    finally:
        connection.close()
