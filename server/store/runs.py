"""SQL of the run aggregate: runs, their batches (idempotency records) and agent drops.

Session contract as in :mod:`gradwatch.server.store` (caller owns the transaction; blocks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    func,
    insert,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from .metric import LAYER_ORDER_METRIC
from .models import (
    AgentDrop,
    Batch,
    Run,
    RunStatus,
    Series,
)

__all__ = [
    "BatchRecord",
    "count_layers",
    "find_overlapping_batches",
    "get_agent_drops",
    "get_batch",
    "get_run",
    "get_run_project",
    "insert_batch",
    "list_runs",
    "max_batch_span",
    "upsert_agent_drops",
]


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """An accepted batch."""

    batch_id: str
    first_step: int
    last_step: int
    n_steps: int


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


def max_batch_span(session: Session, run_id: str) -> int:
    """Steps between the first and the last step of the run's longest batch (0 for none).

    Every block lies within one batch, so no block reaching a step starts further before it.
    """
    statement = select(func.coalesce(func.max(Batch.last_step - Batch.first_step), 0)).where(
        Batch.run_id == run_id
    )
    return int(session.execute(statement).scalar_one())


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
