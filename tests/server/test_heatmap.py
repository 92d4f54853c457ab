"""Heatmap endpoint: per-layer maximum per step bucket, exact for spikes, NaN and +Inf."""

from __future__ import annotations

import math

import pytest

from tests.server.wire import create_run, decode_float, make_batch, post_batch

LAYERS = ["enc", "mid", "head"]


def _post_blocks(client, run_id, steps: int, block: int, spike: tuple[int, int, float]):
    """``steps`` steps in batches of ``block``; every norm 1 except one spike."""
    layer_of_spike, step_of_spike, value = spike
    for first in range(0, steps, block):
        rows = [[1.0] * len(LAYERS) for _ in range(block)]
        if first <= step_of_spike < first + block:
            rows[step_of_spike - first][layer_of_spike] = value
        post_batch(
            client, run_id, make_batch(list(range(first, first + block)), LAYERS, grad_norm=rows)
        )


def _heatmap(client, run_id, **params):
    response = client.get(f"/api/v1/runs/{run_id}/heatmap", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_heatmap_keeps_a_one_step_spike_in_summary_buckets(client):
    run_id = create_run(client)
    _post_blocks(client, run_id, steps=1000, block=50, spike=(1, 637, 1e6))

    out = _heatmap(client, run_id, buckets=10)

    assert out["layers"] == LAYERS
    assert out["bucket_width"] == 100  # a whole number of 50-step blocks
    assert out["step"] == list(range(0, 1000, 100))
    assert (out["start"], out["end"]) == (0, 999)
    assert out["max"][1][6] == 1e6
    assert [row[6] for row in (out["max"][0], out["max"][2])] == [1.0, 1.0]
    assert all(v == 1.0 for j, v in enumerate(out["max"][1]) if j != 6)


def test_heatmap_rounds_the_bucket_width_up_to_whole_blocks(client):
    run_id = create_run(client)
    _post_blocks(client, run_id, steps=1000, block=50, spike=(2, 149, 7.0))

    out = _heatmap(client, run_id, buckets=7)

    assert out["bucket_width"] == 150
    assert len(out["step"]) <= 7
    assert out["max"][2][0] == 7.0


def test_heatmap_zoomed_in_decodes_blocks_for_narrow_buckets(client):
    run_id = create_run(client)
    _post_blocks(client, run_id, steps=200, block=50, spike=(0, 123, 42.0))

    out = _heatmap(client, run_id, start=120, end=129, buckets=10)

    assert out["bucket_width"] == 1
    assert out["step"] == list(range(120, 130))
    assert out["max"][0] == [1.0, 1.0, 1.0, 42.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_heatmap_reports_nan_inf_and_empty_cells(client):
    run_id = create_run(client)
    post_batch(
        client,
        run_id,
        make_batch(
            [0, 1, 2, 3],
            ["a", "b"],
            grad_norm=[[1.0, math.nan], [2.0, math.nan], [math.inf, 3.0], [0.5, math.nan]],
        ),
    )
    post_batch(client, run_id, make_batch([10, 11], ["a", "c"]))

    out = _heatmap(client, run_id, buckets=12)

    assert out["layers"] == ["a", "b", "c"]
    assert out["bucket_width"] == 1
    a, b, c = ([decode_float(v) for v in row] for row in out["max"])
    assert a[:4] == [1.0, 2.0, math.inf, 0.5]
    assert math.isnan(b[0])
    assert math.isnan(b[1])
    assert b[2] == 3.0
    assert a[5] is None  # no step 5 stored
    assert c[:10] == [None] * 10
    assert sorted(map(tuple, out["nan_cells"])) == [(1, 0, 1), (1, 1, 1), (1, 3, 1)]


def test_heatmap_of_a_run_without_data_is_empty(client):
    run_id = create_run(client)

    out = _heatmap(client, run_id)

    assert out["layers"] == []
    assert out["step"] == []
    assert out["start"] is None


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"metric": "global_norm"}, 422),
        ({"start": 5, "end": 4}, 422),
        ({"buckets": 0}, 422),
        ({"buckets": 2001}, 422),
    ],
)
def test_heatmap_refuses_bad_queries(client, params, status):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1]))

    assert client.get(f"/api/v1/runs/{run_id}/heatmap", params=params).status_code == status


def test_heatmap_of_an_unknown_run_is_404(client):
    missing = "00000000-0000-4000-8000-000000000000"
    assert client.get(f"/api/v1/runs/{missing}/heatmap").status_code == 404
