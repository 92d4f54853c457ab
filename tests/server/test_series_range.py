"""Series over any step range the API accepts (0..2⁶³−1): bucket widths never overflow.

A regression test for the run holding steps 0 and 2⁶³−1 (a 500 before: ``OverflowError`` on
SQLite, ``bigint out of range`` on PostgreSQL), and a property test comparing every reply with
a bucketing written here in plain Python ints.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.wire import MAX_STEP
from tests.server.wire import create_run, decode_float, make_batch, post_batch

_EXAMPLES = 25


@pytest.mark.parametrize(
    ("metric", "layer", "expected_max"),
    [("global_norm", None, 3.0), ("nonfinite", "a", 7)],
)
def test_series_range_of_every_step_buckets_without_overflow(client, metric, layer, expected_max):
    run_id = create_run(client)
    body = make_batch([0, MAX_STEP], ["a"], global_norm=[2.0, 3.0], nonfinite=[[0], [7]])
    assert post_batch(client, run_id, body).status_code == 200
    params = {"metric": metric, "max_points": 1} | ({} if layer is None else {"layer": layer})

    response = client.get(f"/api/v1/runs/{run_id}/series", params=params)

    assert response.status_code == 200, response.text
    series = response.json()
    assert series["downsampled"] is True
    assert series["bucket_width"] == 2**63
    assert series["step"] == [0]
    assert series["count"] == [2]
    assert series["max"] == [expected_max]


def _expected(points, lo, hi, max_points):
    """The reply ``read_series`` must give, computed with Python ints and floats only."""
    inside = [(step, value) for step, value in points if lo <= step <= hi]
    if len(inside) <= max_points:
        return {
            "downsampled": False,
            "step": [s for s, _ in inside],
            "value": [v for _, v in inside],
        }
    first, last = inside[0][0], inside[-1][0]
    width = -(-(last - first + 1) // max_points)
    buckets: dict[int, list[float]] = {}
    for step, value in inside:
        buckets.setdefault((step - first) // width, []).append(value)
    out: dict[str, list] = {"step": [], "min": [], "max": [], "last": [], "count": []}
    for index, values in sorted(buckets.items()):
        known = [v for v in values if not math.isnan(v)]
        out["step"].append(first + index * width)
        out["min"].append(min(known) if known else math.nan)
        out["max"].append(max(known) if known else math.nan)
        out["last"].append(values[-1])
        out["count"].append(len(values))
    return {"downsampled": True, "bucket_width": width, **out}


def _decoded(series):
    keys = ("value",) if not series["downsampled"] else ("min", "max", "last")
    for key in keys:
        series[key] = [decode_float(v) for v in series[key]]
    return series


def _same(got, want):
    assert got["downsampled"] is want["downsampled"]
    for key, expected in want.items():
        values = got[key]
        if key in ("value", "min", "max", "last"):
            assert [str(float(v)) for v in values] == [str(float(v)) for v in expected], key
        else:
            assert values == expected, key


_step = st.one_of(st.integers(0, MAX_STEP), st.sampled_from([0, 1, 2, MAX_STEP - 1, MAX_STEP]))
_bound = st.one_of(st.none(), _step)


@st.composite
def _runs(draw):
    """Sorted distinct steps with values, cut into consecutive batches."""
    steps = sorted(draw(st.lists(_step, min_size=1, max_size=12, unique=True)))
    values = draw(
        st.lists(
            st.one_of(st.integers(0, 1000).map(float), st.just(math.nan)),
            min_size=len(steps),
            max_size=len(steps),
        )
    )
    counts = draw(
        st.lists(st.integers(0, 9), min_size=len(steps), max_size=len(steps)),
    )
    cuts = sorted(draw(st.sets(st.integers(1, len(steps)), max_size=3)) | {len(steps)})
    return steps, values, counts, cuts


@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    run=_runs(),
    start=_bound,
    end=_bound,
    max_points=st.one_of(st.integers(1, 4), st.integers(1, 10_000)),
)
def test_series_range_property_matches_plain_python_bucketing(client, run, start, end, max_points):
    steps, values, counts, cuts = run
    if start is not None and end is not None and start > end:
        start, end = end, start
    run_id = create_run(client)
    begin = 0
    for cut in cuts:
        body = make_batch(
            steps[begin:cut],
            ["a"],
            global_norm=values[begin:cut],
            nonfinite=[[count] for count in counts[begin:cut]],
        )
        assert post_batch(client, run_id, body).status_code == 200
        begin = cut
    lo = 0 if start is None else start
    hi = MAX_STEP if end is None else end
    bounds = {"max_points": max_points}
    bounds |= {} if start is None else {"start": start}
    bounds |= {} if end is None else {"end": end}

    for metric, layer, stored in [
        ("global_norm", None, values),
        ("nonfinite", "a", [float(count) for count in counts]),
    ]:
        params = {"metric": metric, **bounds} | ({} if layer is None else {"layer": layer})
        response = client.get(f"/api/v1/runs/{run_id}/series", params=params)

        assert response.status_code == 200, (params, response.text)
        _same(
            _decoded(response.json()),
            _expected(list(zip(steps, stored, strict=True)), lo, hi, max_points),
        )
