"""SQL of the Prometheus scrape: a constant number of queries, whatever the number of runs.

Session contract as in :mod:`gradwatch.server.store` (caller owns the transaction; blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    bindparam,
    cast,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session, aliased

from .metric import Metric
from .models import (
    RUN_LEVEL,
    AgentDrop,
    DetectorCount,
    Run,
    RunStatus,
    Series,
)

__all__ = [
    "RunScrape",
    "scrape_agent_drops",
    "scrape_detector_counts",
    "scrape_runs",
]


@dataclass(frozen=True, slots=True)
class RunScrape:
    """What the Prometheus collector exports for one run: plain values, compared as a whole to
    tell whether the run changed since the last scrape."""

    created_at: datetime
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
    top_layers: str | None
    """``Run.top_layers`` as its JSON text (decoded by the exporter, only for a run whose row
    changed since the last scrape)."""


# Prometheus scrape (a constant number of queries, whatever the number of runs) --------------
#
# The statements are built once (building them cost ~2 ms a scrape, as much as running them);
# the two moments are bound parameters. None reads ``blocks`` or any per-step table, so a
# scrape costs the same however many steps the runs hold.


def _exported() -> ColumnElement[bool]:
    """Runs still exported: running ones that ingested (or were created) since
    ``:ingested_since``, and any whose status changed since ``:finished_since`` (finished or
    failed ones within their grace period).

    ``updated_at`` is never older than ``last_ingest_at`` nor ``created_at`` (see
    ``Run.updated_at``), so every such run also has ``updated_at >= :active_since``, the
    earlier of the two moments: that redundant range lets the database read only recently
    active runs from ``ix_runs_updated_at`` instead of every run ever stored.
    """
    return and_(
        Run.updated_at >= bindparam("active_since"),
        or_(
            and_(
                Run.status == RunStatus.RUNNING.value,
                func.coalesce(Run.last_ingest_at, Run.created_at) >= bindparam("ingested_since"),
            ),
            Run.updated_at >= bindparam("finished_since"),
        ),
    )


def _window(finished_since: datetime, ingested_since: datetime) -> dict[str, datetime]:
    return {
        "finished_since": finished_since,
        "ingested_since": ingested_since,
        "active_since": min(finished_since, ingested_since),
    }


@cache
def _runs_statement() -> Select[*tuple[Any, ...]]:
    global_norm = aliased(Series)
    clipped = aliased(Series)
    loss = aliased(Series)

    def run_level(series: type[Series], metric: Metric) -> ColumnElement[bool]:
        return and_(
            series.run_id == Run.id, series.metric == metric.value, series.layer == RUN_LEVEL
        )

    return (
        select(
            Run.created_at,
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
            cast(Run.top_layers, Text),
        )
        .outerjoin(global_norm, run_level(global_norm, Metric.GLOBAL_NORM))
        .outerjoin(clipped, run_level(clipped, Metric.GLOBAL_NORM_CLIPPED))
        .outerjoin(loss, run_level(loss, Metric.LOSS))
        .where(_exported())  # no ORDER BY: SQLite would then scan runs in created_at order
    )


@cache
def _drops_statement() -> Select[str, str, int]:
    return (
        select(AgentDrop.run_id, AgentDrop.reason, AgentDrop.count)
        .join(Run, Run.id == AgentDrop.run_id)
        .where(_exported())
    )


@cache
def _detections_statement() -> Select[str, str, str, int]:
    return (
        select(
            DetectorCount.run_id, DetectorCount.rule, DetectorCount.severity, DetectorCount.count
        )
        .join(Run, Run.id == DetectorCount.run_id)
        .where(_exported())
    )


def scrape_runs(
    session: Session, *, finished_since: datetime, ingested_since: datetime
) -> list[RunScrape]:
    """Return the exported columns of every exported run (see ``_exported``), with its last
    global norm (before and after clipping) and loss.

    One query: recently active ``runs`` (a range of ``ix_runs_updated_at``) left-joined three
    times to ``series`` on the full unique key, so each run costs three index probes. In
    creation order.
    """
    rows = session.execute(_runs_statement(), _window(finished_since, ingested_since))
    return sorted((RunScrape(*tuple(row)) for row in rows), key=_creation_order)


def _creation_order(run: RunScrape) -> tuple[datetime, str]:
    return run.created_at, run.run_id


def scrape_agent_drops(
    session: Session, *, finished_since: datetime, ingested_since: datetime
) -> list[tuple[str, str, int]]:
    """Return (run_id, reason, count) for every agent drop count of an exported run, by run
    and reason."""
    rows = session.execute(_drops_statement(), _window(finished_since, ingested_since))
    return sorted((run_id, reason, count) for run_id, reason, count in rows)


def scrape_detector_counts(
    session: Session, *, finished_since: datetime, ingested_since: datetime
) -> list[tuple[str, str, str, int]]:
    """Return (run_id, rule, severity, count) for every detection count of an exported run."""
    rows = session.execute(_detections_statement(), _window(finished_since, ingested_since))
    return [(run_id, rule, severity, count) for run_id, rule, severity, count in rows]
