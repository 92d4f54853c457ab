"""Series running summaries as arrays (``store.summary``): the vectorised fold against the
scalar per-series merge it replaced, and the NULL conventions through both databases."""

from __future__ import annotations

import math
import struct
import uuid
from datetime import UTC, datetime

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate
from gradwatch.server.store import summary
from gradwatch.server.store.block import encode_blocks
from gradwatch.server.store.db import Database, create_db_engine
from gradwatch.server.store.metric import MetricKind
from gradwatch.server.store.series import insert_series
from gradwatch.server.store.summary import NO_STEP, Summaries, fold_blocks

# The scalar merge the ingest used before (server/ingest/blocks.py at fc549bc), kept as the
# reference: one series at a time, None for SQL NULL.


def _null_if_nan(value):
    return None if math.isnan(value) else value


def _fold_scalar(old, new, pick):
    if math.isnan(new):
        return old
    return new if old is None else pick(old, new)


def _merge_state(state, block):
    """``state``: (count, nan_count, vmin, vmax, vsum, last_step, vlast), None for NULL;
    ``block``: (count, nan_count, first_step, last_step, vmin, vmax, vlast, vsum), NaN for
    none."""
    count, nan_count, vmin, vmax, vsum, last_step, vlast = state
    b_count, b_nan, _, b_last, b_vmin, b_vmax, b_vlast, b_vsum = block
    old_sum = 0.0 if count == 0 else (math.nan if vsum is None else vsum)
    is_last = last_step is None or b_last > last_step
    return (
        count + b_count,
        nan_count + b_nan,
        _fold_scalar(vmin, b_vmin, min),
        _fold_scalar(vmax, b_vmax, max),
        _null_if_nan(old_sum + b_vsum),
        b_last if is_last else last_step,
        _null_if_nan(b_vlast) if is_last else vlast,
    )


def _rows(summaries):
    """Summaries as scalar rows, None for NULL."""

    def floats(values):
        return [None if math.isnan(v) else v for v in values.tolist()]

    return list(
        zip(
            summaries.count.tolist(),
            summaries.nan_count.tolist(),
            floats(summaries.vmin),
            floats(summaries.vmax),
            floats(summaries.vsum),
            [None if s == NO_STEP else s for s in summaries.last_step.tolist()],
            floats(summaries.vlast),
            strict=True,
        )
    )


def _bits(rows):
    """Rows with floats as their bit patterns, so -0.0 ≠ 0.0 and every NaN is the same."""
    return [tuple(struct.pack("<d", v) if isinstance(v, float) else v for v in row) for row in rows]


def _from_rows(rows):
    columns = list(zip(*rows, strict=True))
    return Summaries(
        id=np.arange(len(rows), dtype=np.int64),
        count=np.array(columns[0], dtype=np.int64),
        nan_count=np.array(columns[1], dtype=np.int64),
        vmin=np.array(columns[2], dtype=np.float64),
        vmax=np.array(columns[3], dtype=np.float64),
        vsum=np.array(columns[4], dtype=np.float64),
        last_step=np.array([NO_STEP if s is None else s for s in columns[5]], dtype=np.int64),
        vlast=np.array(columns[6], dtype=np.float64),
    )


def _fold_like_ingest(old, blocks):
    """What store_blocks does: fold the series whose block holds a value, leave the others."""
    stored = np.flatnonzero(blocks.count > 0)
    folded = fold_blocks(old.take(stored), blocks.take(stored))
    rows = _rows(old)
    for j, row in zip(stored.tolist(), _rows(folded), strict=True):
        rows[j] = row
    return rows


def _scalar_like_ingest(rows, blocks):
    columns = (
        blocks.count,
        blocks.nan_count,
        blocks.first_step,
        blocks.last_step,
        blocks.vmin,
        blocks.vmax,
        blocks.vlast,
        blocks.vsum,
    )
    out = []
    for row, block in zip(rows, zip(*(c.tolist() for c in columns), strict=True), strict=True):
        out.append(row if block[0] == 0 else _merge_state(row, block))
    return out


_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4028235e38, 1e-45]
_values = st.one_of(
    st.sampled_from(_SPECIAL), st.floats(width=32, allow_nan=True, allow_infinity=True)
)


@st.composite
def _batches(draw):
    """A few consecutive (or late) batches of float32 values for ``width`` series, some
    values absent (so some blocks are empty), NaN, ±Inf and signed zeros likely."""
    width = draw(st.integers(1, 6))
    batches = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 5))
        first = draw(st.integers(0, 40))
        steps = np.arange(first, first + n, dtype=np.int64) * draw(st.sampled_from([1, 3]))
        values = draw(hnp.arrays(np.float32, (n, width), elements=_values))
        present = draw(hnp.arrays(np.bool_, (n, width)))
        batches.append((steps, values, None if draw(st.booleans()) else present))
    return width, batches


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_batches())
def test_summary_fold_matches_the_scalar_merge(case):
    width, batches = case
    empty = (0, 0, None, None, None, None, None)
    scalar = [empty] * width
    vector = _from_rows(scalar)
    for steps, values, present in batches:
        blocks = encode_blocks(steps, values, present, MetricKind.FLOAT)
        scalar = _scalar_like_ingest(scalar, blocks)
        rows = _fold_like_ingest(vector, blocks)

        assert _bits(rows) == _bits(scalar)
        vector = _from_rows(rows)


# A stored float is never NaN (NaN is stored as NULL, None here).
_optional_float = st.one_of(st.none(), st.sampled_from(_SPECIAL[:-3]), st.floats(allow_nan=False))
_state = st.tuples(
    st.integers(0, 10),
    st.integers(0, 10),
    _optional_float,
    _optional_float,
    _optional_float,
    st.one_of(st.none(), st.integers(0, 100)),
    _optional_float,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    states=st.lists(_state, min_size=1, max_size=8),
    data=st.data(),
)
def test_summary_fold_matches_the_scalar_merge_from_any_state(states, data):
    """Stored states need not come from folds (older versions, other writers)."""
    n = data.draw(st.integers(1, 4))
    values = data.draw(hnp.arrays(np.float32, (n, len(states)), elements=_values))
    steps = np.arange(n, dtype=np.int64) * 7 + data.draw(st.integers(0, 100))
    blocks = encode_blocks(steps, values, None, MetricKind.FLOAT)

    assert _bits(_fold_like_ingest(_from_rows(states), blocks)) == _bits(
        _scalar_like_ingest(states, blocks)
    )


def test_summary_fold_of_count_metrics_adds_up():
    steps = np.arange(10, 13, dtype=np.int64)
    counts = np.array([[0, 2**40], [3, 0], [0, 1]], dtype=np.int64)
    blocks = encode_blocks(steps, counts, None, MetricKind.COUNT)
    old = _from_rows([(3, 0, 0.0, 5.0, 7.0, 9, 1.0), (0, 0, None, None, None, None, None)])

    folded = fold_blocks(old, blocks)

    assert _rows(folded) == [
        (6, 0, 0.0, 5.0, 10.0, 12, 0.0),
        (3, 0, 0.0, 2.0**40, 2.0**40 + 1, 12, 1.0),
    ]


def test_summary_writes_and_reads_back_null_conventions(database_url, backend):
    """NaN ⇄ NULL, NO_STEP ⇄ NULL, ±Inf as such, 64-bit counts: on both databases
    (PostgreSQL through the binary array parameters). -0.0 comes back as such from
    PostgreSQL; SQLite stores a REAL that is a whole number as an integer, so any of its float
    columns returns 0.0 for it (packed block values keep the sign)."""
    database = Database(create_db_engine(database_url))
    run_id = str(uuid.uuid4())
    keys = [("grad_norm", f"layer_{i}") for i in range(7)]
    rows = [
        (1, 0, 1.5, 2.5, 4.0, 3, 2.5),
        (2, 2, None, None, 0.0, 4, None),
        (3, 1, -np.inf, np.inf, None, 5, np.inf),
        (2**62, 2**40, -0.0, -0.0, -0.0, 2**62, -0.0),
        (0, 0, None, None, None, None, None),
        (5, 0, 1e-300, 1.7976931348623157e308, 1e308, 0, -np.inf),
        (1, 1, None, None, 0.0, 9, None),
    ]
    try:
        with database.write_session() as session:
            create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="s"), datetime.now(UTC))
        with database.write_session() as session, session.begin():
            insert_series(session, run_id, keys)
        with database.write_session() as session, session.begin():
            run = summary.read_summaries(session, run_id)
            at = np.array([run.position[key] for key in keys])
            written = _from_rows(rows)
            written = Summaries(**{**_fields(written), "id": run.summaries.id[at]})
            summary.write_summaries(session, written)
        with database.read_session() as session:
            run = summary.read_summaries(session, run_id)
            read = run.summaries.take(np.array([run.position[key] for key in keys]))
    finally:
        database.engine.dispose()

    if backend == "sqlite":
        rows = [tuple(0.0 if v == 0 and isinstance(v, float) else v for v in r) for r in rows]
    assert _bits(_rows(read)) == _bits(rows)


def _fields(summaries):
    return {name: getattr(summaries, name) for name in Summaries.__slots__}
