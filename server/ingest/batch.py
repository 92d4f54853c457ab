"""The write path: one ``StepBatch`` → block rows and detector events, idempotently, in one
transaction.

Work is split so the database write lock is held briefly: :func:`prepare_batch` (pure NumPy,
no I/O) builds every block first; :func:`ingest_batch` then checks idempotency and writes.

Idempotency:
    * by ``batch_id``: a resend of a stored batch id stores nothing (409 if the same id arrives
      with a different step range);
    * by natural key: a batch whose every step is already stored stores nothing, whatever its
      id;
    * a resumed run (restored from a checkpoint older than its last sent step) resends steps
      it sent before the new ones: when every step of a batch up to the last stored step is
      stored and the rest come after it, only the rest is stored (first write wins; the
      batch's id is recorded for those steps, so resending it is a no-op);
    * any other overlap with stored steps is a conflict (409), because stored blocks of a
      series never overlap.

Detection: every stored batch runs the detectors (``events.detect_batch``) in the same
transaction, under the run's lock, so events, detector state and samples are stored together
or not at all, whichever worker ingests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from ..detect import StepColumns
from ..detect import service as events
from ..errors import BatchConflictError, InvalidBatchError, RunNotFoundError
from ..schemas import BatchAck, StepBatch, encode_float
from ..store import runs as run_store
from ..store import series as series_store
from ..store.block import decode_blocks, encode_blocks
from ..store.incidents import add_incidents
from ..store.metric import METRICS, Metric, Scope
from ..store.models import RUN_LEVEL, Run
from ..store.rollup import chunk_maxima
from ..store.runs import BatchRecord
from .blocks import MetricBlocks, store_blocks
from .columns import BatchColumns, Columns, from_json
from .memo import RunMemo, TransactionMemos, run_version

__all__ = ["IngestOptions", "PreparedBatch", "ingest_batch", "ingest_batches", "prepare_batch"]

_INT64_MAX = 2**63 - 1
_Arrays = Mapping[Metric, Columns | None]
"""Per metric: ``(values (n, S), present or None)``, or None when the batch lacks it."""


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """How batches are accepted and summarised (from ``Settings``).

    Attributes:
        max_steps: Most steps in one batch.
        max_layers: Most layers in one batch.
        norm_window_seconds: Window of ``gradwatch_global_grad_norm_window_max``: the largest
            global norm ingested in the current and the previous window of this many seconds
            (ingest time), so a spike stays visible for at least one window whatever the
            scrape interval.
        top_k_layers: Layers kept per run for ``gradwatch_layer_grad_norm`` (the largest
            norms at the newest step, NaN first).
    """

    max_steps: int
    max_layers: int
    norm_window_seconds: float = 60.0
    top_k_layers: int = 10


@dataclass(frozen=True, slots=True)
class _RunTotals:
    num_steps: int
    clipped_steps: int
    skipped_steps: int
    nonfinite_steps: int
    nonfinite_values: int


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A validated batch turned into block rows, ready to store.

    Attributes:
        record: The batch's idempotency record.
        steps: Its steps, int64.
        metrics: Blocks per metric, in series-creation order (registry order, then layers).
        totals: Increments of the run's running totals.
        samples: Values it carries (``null`` entries excluded).
        columns: What the detectors read, as stored (float32 values).
        global_norm_max: Largest non-NaN global norm of the batch (None when all are NaN).
    """

    record: BatchRecord
    steps: NDArray[np.int64]
    metrics: tuple[MetricBlocks, ...]
    totals: _RunTotals
    samples: int
    columns: StepColumns
    global_norm_max: float | None


def prepare_batch(batch: BatchColumns | StepBatch, limits: IngestOptions) -> PreparedBatch:
    """Check server limits and build the blocks of every series of a batch.

    Pure and vectorised (NumPy over the steps and layers of each metric); thread-safe; does
    not block on I/O.

    Raises:
        InvalidBatchError: Too many steps or layers, or counts whose totals overflow int64.
    """
    batch = _columns(batch)
    n = len(batch)
    if n > limits.max_steps:
        raise InvalidBatchError(
            f"step: {n} steps in one batch, at most {limits.max_steps} allowed; "
            "send smaller batches"
        )
    if len(batch.layers) > limits.max_layers:
        raise InvalidBatchError(
            f"layers: {len(batch.layers)} layers, at most {limits.max_layers} allowed"
        )
    steps = batch.steps
    arrays = batch.metrics
    prepared: list[MetricBlocks] = []
    for spec in METRICS.values():
        columns = arrays[spec.metric]
        if columns is None:
            continue
        values, present = columns
        per_layer = spec.scope is Scope.LAYER
        prepared.append(
            MetricBlocks(
                spec.metric,
                tuple(batch.layers) if per_layer else (RUN_LEVEL,),
                encode_blocks(steps, values, present, spec.kind),
                chunk_maxima(steps, values, present) if per_layer else None,
            )
        )
    totals = _total(arrays, n)
    detector_columns = _detector_columns(arrays, steps, tuple(batch.layers))
    global_norm = detector_columns.global_norm
    finite_or_inf = global_norm[~np.isnan(global_norm)]
    return PreparedBatch(
        record=BatchRecord(
            batch_id=batch.batch_id,
            first_step=int(steps[0]),
            last_step=int(steps[-1]),
            n_steps=n,
        ),
        steps=steps,
        metrics=tuple(prepared),
        totals=totals,
        samples=sum(int(item.blocks.count.sum()) for item in prepared),
        columns=detector_columns,
        global_norm_max=float(finite_or_inf.max()) if finite_or_inf.size else None,
    )


def ingest_batch(
    session: Session,
    run_id: str,
    batch: BatchColumns | StepBatch,
    options: IngestOptions,
    now: datetime,
) -> BatchAck:
    """Store a batch for a run in one transaction (committed here), or nothing at all.

    Blocks while it holds the run's lock (PostgreSQL row lock; the database write lock on
    SQLite). Use a write session (``Database.write_session``); not thread-safe per session.

    Args:
        session: A write session not yet in a transaction; committed on success, rolled
            back on any error.
        run_id: Canonical run uuid.
        batch: The validated batch (a JSON ``StepBatch`` or the columns of either body).
        options: Server limits and the global-norm window.
        now: Ingest time (timezone-aware).

    Returns:
        What was stored; ``duplicate`` is True when the batch had been stored before.

    Raises:
        InvalidBatchError: The batch breaks a size limit.
        RunNotFoundError: No run has this id.
        BatchConflictError: The batch overlaps stored steps without being a resend, or reuses a
            stored batch id for other steps.
    """
    return ingest_batches(session, run_id, [batch], options, now)[0]


def ingest_batches(
    session: Session,
    run_id: str,
    batches: Sequence[BatchColumns | StepBatch],
    options: IngestOptions,
    now: datetime,
) -> list[BatchAck]:
    """Store several batches of one run in one transaction: all of them, or none.

    The same rules as :func:`ingest_batch` apply to each batch in order (a later batch may be
    a resend of an earlier one). One commit for all of them, which is what bulk loaders
    (replaying a local run, benchmarks) want. Blocking; not thread-safe per session.

    Raises:
        InvalidBatchError, RunNotFoundError, BatchConflictError: As :func:`ingest_batch`;
            nothing is stored.
    """
    columns = [_columns(batch) for batch in batches]
    prepared = [prepare_batch(batch, options) for batch in columns]
    memos = TransactionMemos.of(session)
    with session.begin():
        acks = [
            _store(session, run_id, batch, item, options, now, memos)
            for item, batch in zip(prepared, columns, strict=True)
        ]
    memos.publish()  # only now: a rolled-back batch must leave no memo
    return acks


def _store(
    session: Session,
    run_id: str,
    batch: BatchColumns,
    prepared: PreparedBatch,
    options: IngestOptions,
    now: datetime,
    memos: TransactionMemos,
) -> BatchAck:
    record = prepared.record
    run = run_store.get_run(session, run_id, for_update=True)
    if run is None:
        raise RunNotFoundError(run_id)
    memo = memos.get(run_id, run_version(run))
    if batch.incidents:  # before the resend checks: a restarted job's bundle is new
        add_incidents(session, run_id, batch.incidents, now)
    stored = run_store.get_batch(session, run_id, record.batch_id)
    if stored is not None:
        if not _same_batch(stored, prepared.steps):
            raise BatchConflictError(
                f"batch_id {record.batch_id} was already used for steps "
                f"{stored.first_step}..{stored.last_step} ({stored.n_steps} steps); this batch "
                f"has steps {record.first_step}..{record.last_step} ({record.n_steps} steps)"
            )
        return _acknowledge(run_id, prepared, duplicate=True)
    # Every stored batch ends at or before the run's last step, so a batch after it (the usual
    # case) overlaps none: no lookup.
    overlapping: list[BatchRecord] = []
    if run.last_step is not None and record.first_step <= run.last_step:
        overlapping = run_store.find_overlapping_batches(
            session, run_id, record.first_step, record.last_step
        )
    whole = prepared
    if overlapping:
        if _are_stored(session, run_id, prepared.steps):
            return _acknowledge(run_id, prepared, duplicate=True)
        resumed = _new_steps(session, run_id, batch, prepared, overlapping, options)
        if resumed is None:
            first = overlapping[0]
            raise BatchConflictError(
                f"step: steps {record.first_step}..{record.last_step} overlap steps "
                f"{first.first_step}..{first.last_step} already stored by batch "
                f"{first.batch_id}, and the batch is neither a resend of stored steps nor "
                "stored steps followed by new ones; send only new steps"
            )
        prepared, record = resumed, resumed.record
    dropped_batches = batch.dropped_batches or {}
    _check_totals(run, prepared.totals)
    run_store.insert_batch(session, run_id, record, now)
    summaries = store_blocks(
        session, run_id, prepared.metrics, None if memo is None else memo.summaries
    )
    if run.last_step is None or record.last_step > run.last_step:
        run.top_layers = _top_layers(prepared.columns, options.top_k_layers)
    _add_totals(run, prepared, now)
    _fold_norm_window(run, prepared.global_norm_max, now, options.norm_window_seconds)
    state = events.load_state(session, run_id) if memo is None else memo.detector
    state = events.detect_batch(session, run, state, prepared.columns, now)
    if summaries is not None:
        memos.stage(run_id, RunMemo(run_version(run), summaries, state))
    if dropped_batches:
        run_store.upsert_agent_drops(session, run_id, dropped_batches, record.last_step)
    if prepared is not whole:
        return _partial_ack(run_id, whole, prepared)
    return _acknowledge(run_id, prepared, duplicate=False)


def _same_batch(stored: BatchRecord, steps: NDArray[np.int64]) -> bool:
    """Whether a batch with these steps is the stored batch of its id: the same steps, or
    (a resumed run's batch stored in part) the same steps from the stored first step on."""
    tail = steps[steps >= stored.first_step]
    return (
        tail.size == stored.n_steps
        and int(steps[-1]) == stored.last_step
        and (tail.size == steps.size or int(steps[0]) < stored.first_step)
    )


def _new_steps(
    session: Session,
    run_id: str,
    batch: BatchColumns,
    prepared: PreparedBatch,
    overlapping: Sequence[BatchRecord],
    options: IngestOptions,
) -> PreparedBatch | None:
    """The part of a resumed run's batch after the stored steps, prepared; None unless every
    step up to the last stored one is stored and some come after it."""
    stored_end = max(item.last_step for item in overlapping)
    split = int(np.searchsorted(prepared.steps, stored_end, side="right"))
    if split >= prepared.steps.size or not _are_stored(session, run_id, prepared.steps[:split]):
        return None
    return prepare_batch(batch.tail(split), options)


def _columns(batch: BatchColumns | StepBatch) -> BatchColumns:
    return batch if isinstance(batch, BatchColumns) else from_json(batch)


def _partial_ack(run_id: str, whole: PreparedBatch, stored: PreparedBatch) -> BatchAck:
    """The reply to a resumed run's batch of which ``stored`` (its new steps) was stored."""
    return BatchAck(
        run_id=run_id,
        batch_id=whole.record.batch_id,
        steps=whole.record.n_steps,
        stored_samples=stored.samples,
        duplicate_samples=whole.samples - stored.samples,
        duplicate=False,
    )


def _required(arrays: _Arrays, metric: Metric) -> NDArray[np.float32] | NDArray[np.int64]:
    """The values of a metric every batch carries (or that this one is known to carry)."""
    columns = arrays[metric]
    assert columns is not None, f"{metric} is required"
    return columns[0]


def _required_floats(arrays: _Arrays, metric: Metric) -> NDArray[np.float32]:
    """The values of a float metric every batch carries."""
    return _required(arrays, metric).astype(np.float32, copy=False)


def _detector_columns(
    arrays: _Arrays, steps: NDArray[np.int64], layers: tuple[str, ...]
) -> StepColumns:
    return StepColumns(
        steps=steps,
        layers=layers,
        global_norm=_required_floats(arrays, Metric.GLOBAL_NORM)[:, 0],
        grad_norm=_required_floats(arrays, Metric.GRAD_NORM),
        nonfinite=_required(arrays, Metric.NONFINITE).astype(np.int64, copy=False),
        clip_coef=_required_floats(arrays, Metric.CLIP_COEF)[:, 0],
        skipped=_required(arrays, Metric.SKIPPED)[:, 0] != 0,
        loss=None if arrays[Metric.LOSS] is None else _required_floats(arrays, Metric.LOSS)[:, 0],
    )


def _top_layers(columns: StepColumns, k: int) -> dict[str, object]:
    """The ``k`` layers with the largest norm at the batch's last step (see ``Run.top_layers``)."""
    last = columns.grad_norm[-1].astype(np.float64)
    nan = np.isnan(last)
    order = np.lexsort((-np.where(nan, 0.0, last), ~nan))[:k]  # NaN first, then largest
    return {
        "layers": len(columns.layers),
        "top": [[columns.layers[i], encode_float(float(last[i]))] for i in order.tolist()],
    }


def _fold_norm_window(
    run: Run, batch_max: float | None, now: datetime, window_seconds: float
) -> None:
    """Fold a batch's largest global norm into the run's two-window maximum (tumbling
    windows of ingest time; the exported value is the max of the current and previous one)."""
    started = run.norm_window_started_at
    window = timedelta(seconds=window_seconds)
    if started is None or now - started >= window:
        adjacent = started is not None and now - started < 2 * window
        run.norm_window_previous_max = run.norm_window_max if adjacent else None
        run.norm_window_max = batch_max
        run.norm_window_started_at = now
    elif batch_max is not None:
        current = run.norm_window_max
        run.norm_window_max = batch_max if current is None else max(current, batch_max)


def _total(arrays: _Arrays, n: int) -> _RunTotals:
    nonfinite = _required(arrays, Metric.NONFINITE)
    global_norm = _required(arrays, Metric.GLOBAL_NORM)[:, 0]
    if nonfinite.size and int(nonfinite.max()) > _INT64_MAX // nonfinite.size:
        raise InvalidBatchError("nonfinite: counts too large (their sum overflows int64)")
    return _RunTotals(
        num_steps=n,
        clipped_steps=int((_required(arrays, Metric.CLIP_COEF)[:, 0] < 1).sum()),
        skipped_steps=int(_required(arrays, Metric.SKIPPED).sum()),
        nonfinite_steps=int(((nonfinite > 0).any(axis=1) | ~np.isfinite(global_norm)).sum()),
        nonfinite_values=int(nonfinite.sum()),
    )


def _are_stored(session: Session, run_id: str, steps: NDArray[np.int64]) -> bool:
    """Whether every step is stored already (read from the run's ``global_norm`` blocks,
    which hold every step of every stored batch)."""
    series_id = series_store.find_series_id(session, run_id, Metric.GLOBAL_NORM, RUN_LEVEL)
    if series_id is None:
        return False
    blocks = series_store.fetch_blocks(session, series_id, int(steps[0]), int(steps[-1]))
    stored_steps, _ = decode_blocks(blocks, METRICS[Metric.GLOBAL_NORM].kind)
    return bool(np.isin(steps, stored_steps).all())


def _check_totals(run: Run, totals: _RunTotals) -> None:
    if run.nonfinite_values + totals.nonfinite_values > _INT64_MAX:
        raise InvalidBatchError("nonfinite: the run's total of non-finite values overflows int64")


def _acknowledge(run_id: str, prepared: PreparedBatch, *, duplicate: bool) -> BatchAck:
    return BatchAck(
        run_id=run_id,
        batch_id=prepared.record.batch_id,
        steps=prepared.record.n_steps,
        stored_samples=0 if duplicate else prepared.samples,
        duplicate_samples=prepared.samples if duplicate else 0,
        duplicate=duplicate,
    )


def _add_totals(run: Run, prepared: PreparedBatch, now: datetime) -> None:
    totals = prepared.totals
    run.num_steps += totals.num_steps
    run.clipped_steps += totals.clipped_steps
    run.skipped_steps += totals.skipped_steps
    run.nonfinite_steps += totals.nonfinite_steps
    run.nonfinite_values += totals.nonfinite_values
    last_step = prepared.record.last_step
    run.last_step = last_step if run.last_step is None else max(run.last_step, last_step)
    run.last_ingest_at = now
    run.updated_at = now
