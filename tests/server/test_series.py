"""Series queries: ranges, downsampling that keeps spikes, and parameter validation."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from gradwatch.server.series import bucket_series
from tests.server.wire import create_run, get_series, make_batch, post_batch


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
