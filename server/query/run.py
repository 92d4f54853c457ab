"""Run lifecycle and overviews: create (idempotent), set status, get, list, layers.

Functions take a :class:`~sqlalchemy.orm.Session`, block on the database, and return response
models from ``schemas``. Writers commit; readers never do. A session belongs to one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import InvalidQueryError, RunNotFoundError
from ..freeform import check_free_json
from ..schemas import LayerOut, LayersOut, RunCreate, RunList, RunOut
from ..store import runs as run_store
from ..store import series as series_store
from ..store.metric import Metric
from ..store.models import Run, RunStatus
from ..store.series import SeriesState
from .cursor import decode_cursor, encode_cursor
from .summary import last_value, max_value

__all__ = ["create_run", "get_run", "list_layers", "list_runs", "set_run_status"]

_ENDPOINT = "GET /api/v1/runs"


def create_run(session: Session, request: RunCreate, now: datetime) -> tuple[RunOut, bool]:
    """Create a run unless its id exists, in one transaction (committed here).

    Idempotent: when the id exists, the stored run is returned unchanged. The session must
    not be in a transaction yet.

    Returns:
        The run, and whether this call created it.
    """
    run_id = str(request.run_id)
    try:
        with session.begin():
            existing = run_store.get_run(session, run_id, for_update=True)
            if existing is not None:
                return _summarise(session, [existing])[0], False
            run = Run(
                id=run_id,
                project=request.project,
                name=request.name,
                status=RunStatus.RUNNING.value,
                created_at=now,
                updated_at=now,
                config=request.config,
                num_steps=0,
                clipped_steps=0,
                skipped_steps=0,
                nonfinite_steps=0,
                nonfinite_values=0,
            )
            session.add(run)
            session.flush()
            return _summarise(session, [run])[0], True
    except IntegrityError:
        # A concurrent request created the same run first (PostgreSQL): it exists now.
        with session.begin():
            return get_run(session, run_id), False


def set_run_status(session: Session, run_id: str, status: RunStatus, now: datetime) -> RunOut:
    """Set a run's status in one transaction (committed here).

    The session must not be in a transaction yet.

    Raises:
        RunNotFoundError: No run has this id.
    """
    with session.begin():
        run = run_store.get_run(session, run_id, for_update=True)
        if run is None:
            raise RunNotFoundError(run_id)
        if run.status != status.value:
            run.status = status.value
            run.updated_at = now
            session.flush()
        return _summarise(session, [run])[0]


def get_run(session: Session, run_id: str) -> RunOut:
    """Return one run with its totals.

    Raises:
        RunNotFoundError: No run has this id.
    """
    run = run_store.get_run(session, run_id)
    if run is None:
        raise RunNotFoundError(run_id)
    return _summarise(session, [run])[0]


def list_runs(
    session: Session,
    *,
    project: str | None = None,
    status: RunStatus | None = None,
    name_contains: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> RunList:
    """Return one page of runs, newest first (keyset pagination on (created_at, id)).

    Raises:
        InvalidQueryError: ``cursor`` was not produced by this function.
    """
    runs = run_store.list_runs(
        session,
        project=project,
        status=status,
        name_contains=name_contains,
        before=None if cursor is None else _decode_cursor(cursor),
        limit=limit + 1,
    )
    page = runs[:limit]
    next_cursor = _encode_cursor(page[-1]) if len(runs) > limit else None
    return RunList(runs=_summarise(session, page), next_cursor=next_cursor)


def list_layers(session: Session, run_id: str) -> LayersOut:
    """Return the layers of a run in layer order: gradient-norm summary, latest weight stats.

    Raises:
        RunNotFoundError: No run has this id.
    """
    if run_store.get_run(session, run_id) is None:
        raise RunNotFoundError(run_id)
    weights = series_store.list_layer_latest(session, run_id, Metric.WEIGHT_NORM)
    ratios = series_store.list_layer_latest(session, run_id, Metric.UPDATE_RATIO)
    return LayersOut(
        run_id=run_id,
        layers=[
            LayerOut(
                index=index,
                name=stats.name,
                latest_grad_norm=last_value(stats.last_step, stats.vlast),
                max_grad_norm=max_value(stats.count, stats.vmax),
                nonfinite_values=stats.nonfinite_values,
                latest_weight_norm=last_value(*weights.get(stats.name, (None, None))),
                latest_update_ratio=last_value(*ratios.get(stats.name, (None, None))),
            )
            for index, stats in enumerate(series_store.list_layer_stats(session, run_id))
        ],
    )


def _summarise(session: Session, runs: Sequence[Run]) -> list[RunOut]:
    """Build ``RunOut`` for runs with three extra queries in all (not per run)."""
    if not runs:
        return []
    run_ids = [run.id for run in runs]
    layers = run_store.count_layers(session, run_ids)
    global_norms = series_store.get_run_series_states(session, run_ids, Metric.GLOBAL_NORM)
    drops = run_store.get_agent_drops(session, run_ids)
    outs = []
    for run in runs:
        config, config_error = _readable_config(run.config)
        outs.append(
            RunOut(
                run_id=run.id,
                project=run.project,
                name=run.name,
                status=RunStatus(run.status),
                created_at=run.created_at,
                updated_at=run.updated_at,
                config=config,
                config_error=config_error,
                last_step=run.last_step,
                last_ingest_at=run.last_ingest_at,
                num_steps=run.num_steps,
                num_layers=layers.get(run.id, 0),
                clipped_steps=run.clipped_steps,
                skipped_steps=run.skipped_steps,
                nonfinite_steps=run.nonfinite_steps,
                nonfinite_values=run.nonfinite_values,
                max_global_norm=_series_max(global_norms.get(run.id)),
                dropped_batches=drops.get(run.id, {}),
            )
        )
    return outs


def _readable_config(config: object) -> tuple[dict[str, Any] | None, str | None]:
    """A stored config as it can be returned, or None and why not.

    Every config accepted now passes; one stored before the limits existed (256 levels deep
    broke the serialisation of every list holding it) is left out of its run's reply only.
    """
    if config is None:
        return None, None
    if not isinstance(config, dict):
        return None, f"stored config is a JSON {type(config).__name__}, not an object"
    try:
        check_free_json(config, "config")
    except ValueError as error:
        return None, f"stored config not returned: {error}"
    return config, None


def _series_max(state: SeriesState | None) -> float | None:
    return None if state is None else max_value(state.count, state.vmax)


def _encode_cursor(run: Run) -> str:
    return encode_cursor([run.created_at.isoformat(), run.id])


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    created_at, run_id = decode_cursor(cursor, (str, str), _ENDPOINT)
    try:
        position = datetime.fromisoformat(str(created_at)), str(run_id)
    except ValueError as error:
        raise InvalidQueryError(f"cursor: not a cursor returned by {_ENDPOINT}") from error
    if position[0].tzinfo is None:
        raise InvalidQueryError(f"cursor: not a cursor returned by {_ENDPOINT}")
    return position
