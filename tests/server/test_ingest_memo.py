"""What ingest remembers of a run between batches (``ingest.memo``): every batch stores exactly
what it stores after reading the database, whatever another worker, a rolled-back transaction
or a deleted and re-created run did in between. Each test ingests the same batches into a
reference database with nothing remembered and compares everything the batches wrote."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import delete, select

from gradwatch.server.errors import BatchConflictError
from gradwatch.server.ingest import memo as memo_module
from gradwatch.server.ingest.batch import IngestOptions, ingest_batch, ingest_batches
from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store import summary
from gradwatch.server.store.db import Database, create_db_engine
from gradwatch.server.store.models import DetectorCount, DetectorState, Event, Run, Series
from tests.server.wire import make_batch

_OPTIONS = IngestOptions(max_steps=10_000, max_layers=1_000)
_T0 = datetime(2026, 12, 7, tzinfo=UTC)
_STEPS = 20


def _batches(seed: int, count: int) -> list[StepBatch]:
    """``count`` batches of 20 steps: lognormal norms with spikes, NaN, +Inf and non-finite
    counts, a loss from the 4th batch on, a layer more from the 6th (a new series mid-run)."""
    rng = np.random.default_rng(seed)
    batches = []
    for k in range(count):
        layers = [f"model/dense_{i}" for i in range(4 if k < 5 else 5)]
        grad = rng.lognormal(0.0, 0.4, size=(_STEPS, len(layers)))
        grad[rng.integers(_STEPS), rng.integers(len(layers))] *= 1e4  # an explosion
        if k % 3 == 1:
            grad[rng.integers(_STEPS), 0] = np.nan
        if k % 4 == 2:
            grad[rng.integers(_STEPS), 1] = np.inf
        nonfinite = np.zeros((_STEPS, len(layers)), np.int64)
        nonfinite[rng.integers(_STEPS), rng.integers(len(layers))] = k % 3
        body = make_batch(
            list(range(k * _STEPS, (k + 1) * _STEPS)),
            layers,
            grad_norm=grad.tolist(),
            global_norm=np.sqrt((grad**2).sum(axis=1)).tolist(),
            nonfinite=nonfinite.tolist(),
            loss=rng.random(_STEPS).tolist() if k >= 3 else None,
        )
        batches.append(StepBatch.model_validate(body))
    return batches


def _new_run(database: Database, run_id: str, at: datetime) -> None:
    with database.write_session() as session:
        create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="memo"), at)


def _ingest(database: Database, run_id: str, batch: StepBatch, at: datetime) -> None:
    with database.write_session() as session:
        ingest_batch(session, run_id, batch, _OPTIONS, at)


def _stored(database: Database, run_id: str) -> dict[str, object]:
    """Everything ingest writes for a run, without database ids."""
    with database.read_session() as session:
        series = session.execute(
            select(
                Series.metric, Series.layer, Series.count, Series.nan_count, Series.vmin,
                Series.vmax, Series.vsum, Series.last_step, Series.vlast,
            ).where(Series.run_id == run_id).order_by(Series.metric, Series.layer)
        ).all()  # fmt: skip
        state = session.scalar(select(DetectorState.state).where(DetectorState.run_id == run_id))
        events = session.execute(
            select(
                Event.rule, Event.layer, Event.severity, Event.first_step, Event.last_step,
                Event.count, Event.value, Event.baseline, Event.onset,
            ).where(Event.run_id == run_id).order_by(Event.first_step, Event.rule, Event.layer)
        ).all()  # fmt: skip
        counts = session.execute(
            select(DetectorCount.rule, DetectorCount.severity, DetectorCount.count)
            .where(DetectorCount.run_id == run_id)
            .order_by(DetectorCount.rule, DetectorCount.severity)
        ).all()
        run = session.get(Run, run_id)
        assert run is not None
        totals = (run.num_steps, run.last_step, run.nonfinite_values, run.top_layers)
    # NaN != NaN: compare floats by repr so NaN summaries compare equal.
    return {
        "series": [tuple(repr(value) for value in row) for row in series],
        "state": state,
        "events": [tuple(repr(value) for value in row) for row in events],
        "counts": list(counts),
        "totals": totals,
    }


@pytest.fixture
def two_databases(make_database_url):
    """(database under test, reference database read afresh by every batch)."""
    engines = [create_db_engine(make_database_url()) for _ in range(2)]
    yield tuple(Database(engine) for engine in engines)
    for engine in engines:
        engine.dispose()


@pytest.fixture
def memos(monkeypatch):
    """A fresh process-wide memo store (so tests never share memos)."""
    fresh = memo_module.RunMemos()
    monkeypatch.setattr(memo_module, "MEMOS", fresh)
    return fresh


def _reference(database: Database, run_id: str, batches: list[StepBatch], memos) -> None:
    _new_run(database, run_id, _T0)
    for k, batch in enumerate(batches):
        memos.clear()
        _ingest(database, run_id, batch, _T0 + timedelta(seconds=k))
    memos.clear()


def test_remembered_runs_store_what_a_fresh_read_stores(two_databases, memos, monkeypatch):
    tested, reference = two_databases
    run_id = str(uuid.uuid4())
    batches = _batches(seed=1, count=10)
    reads = []
    real_read = summary.read_summaries

    def counted_read(*args):
        reads.append(args)
        return real_read(*args)

    monkeypatch.setattr(summary, "read_summaries", counted_read)
    _new_run(tested, run_id, _T0)
    for k, batch in enumerate(batches):
        _ingest(tested, run_id, batch, _T0 + timedelta(seconds=k))
    # Read for the first batch (nothing remembered yet), and after the batches that add
    # series (the first, the loss's, the new layer's: the new ids come from the database).
    assert len(reads) == 4
    reads.clear()
    _reference(reference, run_id, batches, memos)
    assert len(reads) == 13  # every batch, and again after adding series
    assert _stored(tested, run_id) == _stored(reference, run_id)


def test_a_batch_stored_by_another_worker_is_never_hidden_by_a_memo(
    two_databases, memos, monkeypatch
):
    """Two processes (two memo stores) take turns ingesting one run, in a random order."""
    tested, reference = two_databases
    run_id = str(uuid.uuid4())
    batches = _batches(seed=2, count=12)
    workers = [memos, memo_module.RunMemos()]
    _new_run(tested, run_id, _T0)
    for k, batch in enumerate(batches):
        monkeypatch.setattr(memo_module, "MEMOS", workers[(k * 7 // 3) % 2])
        _ingest(tested, run_id, batch, _T0 + timedelta(seconds=k))
    monkeypatch.setattr(memo_module, "MEMOS", memos)
    _reference(reference, run_id, batches, memos)
    assert _stored(tested, run_id) == _stored(reference, run_id)


def test_a_rolled_back_transaction_leaves_no_memo(two_databases, memos, monkeypatch):
    """After a rolled-back batch, another worker takes the run to the step count that batch
    would have: only a memo published before the commit could tell them apart."""
    tested, reference = two_databases
    run_id = str(uuid.uuid4())
    batches = _batches(seed=3, count=6)
    _new_run(tested, run_id, _T0)
    _ingest(tested, run_id, batches[0], _T0)
    clash = batches[1].model_copy(update={"batch_id": batches[0].batch_id})
    with tested.write_session() as session, pytest.raises(BatchConflictError):
        # batches[2] is stored in the transaction, then the clash rolls it back.
        ingest_batches(session, run_id, [batches[2], clash], _OPTIONS, _T0)
    monkeypatch.setattr(memo_module, "MEMOS", memo_module.RunMemos())
    _ingest(tested, run_id, batches[1], _T0)
    monkeypatch.setattr(memo_module, "MEMOS", memos)
    for k, batch in enumerate(batches[2:], start=2):
        _ingest(tested, run_id, batch, _T0 + timedelta(seconds=k))
    _reference(reference, run_id, batches, memos)
    assert _stored(tested, run_id) == _stored(reference, run_id)


def test_a_deleted_and_recreated_run_is_read_afresh(two_databases, memos, monkeypatch):
    """The re-created run reaches the remembered step count in another worker: only its
    ``created_at`` and ``updated_at`` tell the memo from it."""
    tested, reference = two_databases
    run_id = str(uuid.uuid4())
    first_life, batches = _batches(seed=4, count=2), _batches(seed=5, count=3)
    _new_run(tested, run_id, _T0)
    for batch in first_life:
        _ingest(tested, run_id, batch, _T0)  # remembered at (_T0, 40 steps)
    with tested.write_session() as session, session.begin():
        session.execute(delete(Run).where(Run.id == run_id))
    other = memo_module.RunMemos()
    monkeypatch.setattr(memo_module, "MEMOS", other)
    _new_run(tested, run_id, _T0 + timedelta(hours=1))
    for batch in batches[:2]:
        _ingest(tested, run_id, batch, _T0 + timedelta(hours=1))
    monkeypatch.setattr(memo_module, "MEMOS", memos)
    _ingest(tested, run_id, batches[2], _T0 + timedelta(hours=1))
    _reference(reference, run_id, batches, memos)
    assert _stored(tested, run_id) == _stored(reference, run_id)
