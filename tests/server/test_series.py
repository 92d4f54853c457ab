"""Series queries: ranges, downsampling that keeps spikes, and parameter validation."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from gradwatch.server.query.series import bucket_series
from gradwatch.server.store import series as series_store
from tests.server.wire import (
    create_run,
    decode_float,
    encode_float,
    get_series,
    make_batch,
    post_batch,
)


def _ingest_steps(client, run_id, steps, global_norm, batch_size=250):
    for lo in range(0, len(steps), batch_size):
        chunk = slice(lo, lo + batch_size)
        body = make_batch(list(steps[chunk]), global_norm=list(global_norm[chunk]))
        assert post_batch(client, run_id, body).status_code == 200


def test_series_downsampling_keeps_one_step_spike(client):
    run_id = create_run(client)
    steps = list(range(1000))
    norms = [1.0] * 1000
    norms[537] = 1e6
    norms[900] = float("nan")
    _ingest_steps(client, run_id, steps, norms)

    series = get_series(client, run_id, "global_norm", max_points=100)

    assert series["downsampled"] is True
    assert series["bucket_width"] == 10
    assert len(series["step"]) == 100
    assert series["step"][:3] == [0, 10, 20]
    assert sum(series["count"]) == 1000
    assert max(series["max"]) == 1e6
    assert series["max"][53] == 1e6
    assert series["min"][53] == 1.0
    assert series["max"][90] == 1.0
    assert series["last"][53] == 1.0
    assert "value" not in series


def test_series_downsampling_counts_sum_to_steps_in_range(client):
    run_id = create_run(client)
    steps = list(range(0, 3000, 3))
    _ingest_steps(client, run_id, steps, [float(s) for s in steps])

    series = get_series(client, run_id, "global_norm", start=100, end=2000, max_points=7)

    in_range = [s for s in steps if 100 <= s <= 2000]
    assert series["downsampled"] is True
    assert len(series["step"]) <= 7
    assert sum(series["count"]) == len(in_range)
    assert series["step"][0] == in_range[0]
    assert series["min"][0] == in_range[0]
    assert series["max"][-1] == in_range[-1]
    assert series["last"][-1] == in_range[-1]
    width = series["bucket_width"]
    assert (in_range[-1] - in_range[0]) // width < 7


def test_series_range_is_inclusive_and_raw_under_max_points(client):
    run_id = create_run(client)
    steps = list(range(100))
    _ingest_steps(client, run_id, steps, [float(s) for s in steps], batch_size=30)

    series = get_series(client, run_id, "global_norm", start=25, end=64)

    assert series["downsampled"] is False
    assert series["step"] == list(range(25, 65))
    assert series["value"] == [float(s) for s in range(25, 65)]
    assert get_series(client, run_id, "global_norm", start=200)["step"] == []
    assert get_series(client, run_id, "global_norm", end=0)["step"] == [0]


def test_series_all_nan_bucket_is_nan():
    steps = np.arange(10, dtype=np.int64)
    values = np.array([np.nan] * 5 + [1, np.nan, np.inf, 2, 3], dtype=np.float32)

    buckets = bucket_series(steps, values, 2)

    assert buckets.width == 5
    assert np.isnan(buckets.min[0])
    assert np.isnan(buckets.max[0])
    assert buckets.min[1] == 1
    assert buckets.max[1] == np.inf
    assert buckets.last.tolist() == [pytest.approx(np.nan, nan_ok=True), 3.0]
    assert buckets.count.tolist() == [5, 5]


def test_series_buckets_skip_empty_ranges():
    steps = np.array([0, 1, 2, 1000, 1001], dtype=np.int64)
    values = np.array([5, 7, 6, 1, 9], dtype=np.int64)

    buckets = bucket_series(steps, values, 4)

    assert buckets.width == 251
    assert buckets.start.tolist() == [0, 753]
    assert buckets.min.tolist() == [5, 1]
    assert buckets.max.tolist() == [7, 9]
    assert buckets.count.tolist() == [3, 2]


def test_series_count_metric_values_are_integers(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1], nonfinite=[[0, 4], [0, 0]]))

    series = get_series(client, run_id, "nonfinite", layer="dense_1")

    assert series["value"] == [4, 0]
    assert all(isinstance(v, int) for v in series["value"])


@pytest.mark.parametrize(
    ("params", "status", "text"),
    [
        ({"metric": "grad_norm"}, 422, "layer"),
        ({"metric": "loss", "layer": "dense"}, 422, "run-level"),
        ({"metric": "gradnorm"}, 422, "grad_norm"),
        ({"metric": "grad_norm", "layer": "nope"}, 404, "nope"),
        ({"metric": "loss", "start": 5, "end": 4}, 422, "start"),
        ({"metric": "loss", "max_points": 0}, 422, "max_points"),
        ({"metric": "loss", "max_points": 10_001}, 422, "max_points"),
        ({"metric": "loss", "start": -1}, 422, "start"),
        ({"metric": "loss", "end": 2**63}, 422, "end"),
        ({"metric": "grad_norm", "layer": "dense\x00"}, 422, "layer"),
        ({"metric": "loss", "raw": "maybe"}, 422, "raw"),
    ],
)
def test_series_rejects_bad_parameters(client, params, status, text):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0]))

    response = client.get(f"/api/v1/runs/{run_id}/series", params=params)

    assert response.status_code == status
    assert text in response.text


def test_series_unknown_run_is_404(client):
    response = client.get(f"/api/v1/runs/{uuid.uuid4()}/series", params={"metric": "loss"})
    assert response.status_code == 404


def _raw(client, run_id, metric, **params):
    body = get_series(client, run_id, metric, max_points=10_000, **params)
    assert body["downsampled"] is False
    return body


def _as_float(values):
    return np.array([decode_float(v) for v in values], dtype=np.float64)


def _same_buckets(got, want):
    assert got["bucket_width"] == want.width
    assert got["step"] == want.start.tolist()
    assert got["count"] == want.count.tolist()
    for key, expected in (("min", want.min), ("max", want.max), ("last", want.last)):
        np.testing.assert_array_equal(_as_float(got[key]), expected.astype(np.float64), key)


def test_series_summary_path_matches_bucketing_every_value(client):
    rng = np.random.default_rng(11)
    run_id = create_run(client)
    step = 0
    for _ in range(60):
        n = int(rng.integers(1, 40))
        steps = step + np.cumsum(rng.integers(1, 4, size=n))
        step = int(steps[-1]) + int(rng.integers(1, 30))
        norms = rng.lognormal(0, 1, size=(n, 1)).astype(np.float32).astype(float)
        norms[rng.random((n, 1)) < 0.05] = np.nan
        norms[rng.random((n, 1)) < 0.02] = np.inf
        weights = [[float(v) if rng.random() < 0.3 else None] for v in norms[:, 0]]
        body = make_batch(
            steps.tolist(),
            ["a"],
            grad_norm=norms.tolist(),
            weight_norm=[[encode_float(v) for v in row] for row in weights],
        )
        assert post_batch(client, run_id, body).status_code == 200
    for metric in ("grad_norm", "weight_norm"):
        full = _raw(client, run_id, metric, layer="a")
        all_steps = np.array(full["step"], dtype=np.int64)
        all_values = _as_float(full["value"])
        for start, end, points in [
            (None, None, 7),
            (None, None, 100),
            (13, None, 50),
            (None, int(all_steps[-1]) - 17, 33),
            (int(all_steps[40]) + 1, int(all_steps[-40]), 9),
            (0, int(all_steps[-1]), 1),
        ]:
            params = {"layer": "a", "max_points": points}
            params |= {} if start is None else {"start": start}
            params |= {} if end is None else {"end": end}
            got = get_series(client, run_id, metric, **params)
            inside = (all_steps >= (start or 0)) & (all_steps <= (end or 2**62))
            want = bucket_series(all_steps[inside], all_values[inside], points)
            assert got["downsampled"] is True, (metric, params)
            _same_buckets(got, want)


def test_series_whole_blocks_are_read_from_summaries(client, monkeypatch):
    run_id = create_run(client)
    norms = [1.0] * 1000
    norms[537] = 1e6
    _ingest_steps(client, run_id, list(range(1000)), norms, batch_size=10)
    decoded: list[int] = []
    for name in ("fetch_cut_blocks", "fetch_split_blocks", "fetch_blocks"):
        original = getattr(series_store, name)

        def recording(*args, _original=original, **kwargs):
            blocks = _original(*args, **kwargs)
            decoded.extend(block.first_step for block in blocks)
            return blocks

        monkeypatch.setattr(series_store, name, recording)

    aligned = get_series(client, run_id, "global_norm", max_points=100)
    assert decoded == []
    cut = get_series(client, run_id, "global_norm", start=5, end=994, max_points=99)

    assert aligned["bucket_width"] == 10
    assert aligned["max"][53] == 1e6
    assert sum(aligned["count"]) == 1000
    assert decoded[:2] == [0, 990]  # the blocks cut by start and end, then the split ones
    assert sum(cut["count"]) == 990
    assert max(cut["max"]) == 1e6


def test_series_raw_pages_by_keyset(client):
    run_id = create_run(client)
    steps = list(range(0, 600, 2))
    _ingest_steps(client, run_id, steps, [float(s) for s in steps], batch_size=37)

    pages = []
    params = {"raw": "true", "max_points": 64, "start": 11, "end": 501}
    while True:
        page = get_series(client, run_id, "global_norm", **params)
        assert page["downsampled"] is False
        assert len(page["step"]) <= 64
        pages.append(page)
        if page["next_start"] is None:
            break
        assert page["next_start"] > page["step"][-1]
        params["start"] = page["next_start"]

    seen = [step for page in pages for step in page["step"]]
    assert seen == [s for s in steps if 11 <= s <= 501]
    assert [v for page in pages for v in page["value"]] == [float(s) for s in seen]
    assert len(pages) == -(-len(seen) // 64)


def test_series_raw_page_of_everything_has_no_next(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1, 2]))
    page = get_series(client, run_id, "global_norm", raw="true")
    assert page["step"] == [0, 1, 2]
    assert page["next_start"] is None
    assert get_series(client, run_id, "global_norm", raw="true", start=3)["step"] == []
