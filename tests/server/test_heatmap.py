"""Heatmap endpoint: per-layer maximum per step bucket, exact for spikes, NaN and +Inf."""

from __future__ import annotations

import math
from importlib.resources import as_file, files

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import inspect

from gradwatch.server.app import create_app
from gradwatch.server.query import heatmap as heatmap_query
from gradwatch.server.store.db import create_db_engine
from gradwatch.wire import MAX_STEP
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


def _random_run(client, seed: int) -> tuple[str, dict[str, dict[int, float]]]:
    """A run of 5,000 steps in 300-step batches (crossing chunk boundaries) with NaN, +Inf, a
    layer that appears at step 2,100 and a stretch where layer ``b`` is all NaN; returns it
    with the stored (float32) values per layer and step."""
    rng = np.random.default_rng(seed)
    run_id = create_run(client)
    stored: dict[str, dict[int, float]] = {"a": {}, "b": {}, "c": {}}
    for first in range(0, 5000, 300):
        steps = list(range(first, min(first + 300, 5000)))
        layers = ["a", "b"] if first < 2100 else ["a", "b", "c"]
        values = rng.lognormal(0.0, 2.0, size=(len(steps), len(layers))).astype(np.float32)
        values[rng.random(values.shape) < 0.01] = np.nan
        if first == 3000:
            values[7, 0] = np.inf
        for i, step in enumerate(steps):
            if 1024 <= step < 2048:
                values[i, 1] = np.nan
            for j, layer in enumerate(layers):
                stored[layer][step] = float(values[i, j])
        rows = [[float(v) for v in row] for row in values]
        post_batch(client, run_id, make_batch(steps, layers, grad_norm=rows))
    return run_id, stored


def _expected_row(values: dict[int, float], origin: int, width: int, count: int) -> list:
    """Largest non-NaN value per bucket, NaN when all are NaN, None when empty; 4 digits."""
    cells: list[list[float]] = [[] for _ in range(count)]
    for step, value in values.items():
        j = (step - origin) // width
        if 0 <= j < count:
            cells[j].append(value)
    out: list = []
    for cell in cells:
        finite = [v for v in cell if not math.isnan(v)]
        if not cell:
            out.append(None)
        elif not finite:
            out.append(math.nan)
        else:
            top = max(finite)
            out.append(float(f"{top:.4g}") if math.isfinite(top) else top)
    return out


@pytest.mark.parametrize(
    ("params", "origin", "width"),
    [
        ({"buckets": 5}, 0, 1024),
        ({"buckets": 3}, 0, 2048),
        ({"start": 1500, "end": 4000, "buckets": 3}, 1024, 1024),
    ],
)
def test_heatmap_from_chunk_rollups_equals_the_stored_values(
    client, monkeypatch, params, origin, width
):
    monkeypatch.setattr(heatmap_query, "BLOCK_ROWS", 0)  # read every range from rollups
    run_id, stored = _random_run(client, seed=7)

    out = _heatmap(client, run_id, **params)

    end = params.get("end", 4999)
    count = (end - origin) // width + 1
    assert out["bucket_width"] == width
    assert out["step"] == [origin + j * width for j in range(count)]
    assert out["layers"] == ["a", "b", "c"]
    for layer, row in zip(out["layers"], out["max"], strict=True):
        got = [decode_float(v) for v in row]
        want = _expected_row(stored[layer], origin, width, count)
        assert [("nan" if v is not None and math.isnan(v) else v) for v in got] == [
            ("nan" if v is not None and math.isnan(v) else v) for v in want
        ], layer
    nan_cells = {
        (i, j, n)
        for i, layer in enumerate(out["layers"])
        for j in range(count)
        if (
            n := sum(
                1
                for step, v in stored[layer].items()
                if math.isnan(v) and (step - origin) // width == j
            )
        )
    }
    assert set(map(tuple, out["nan_cells"])) == nan_cells


@pytest.mark.parametrize("block_rows", [0, 10**9], ids=["rollups", "block-summaries"])
@pytest.mark.parametrize(
    ("params", "origin", "step"),
    [
        ({"buckets": 1}, 0, [0]),
        ({"buckets": 1, "start": 1}, 0, [0]),
        ({"buckets": 2}, 0, [0, 2**62]),
    ],
)
def test_heatmap_of_every_possible_step_buckets_without_overflow(
    client, monkeypatch, block_rows, params, origin, step
):
    """Steps 0 and 2⁶³−1 with one bucket: a width of 2⁶³ (a 500 before, like the series)."""
    monkeypatch.setattr(heatmap_query, "BLOCK_ROWS", block_rows)
    run_id = create_run(client)
    body = make_batch([0, MAX_STEP], ["a"], grad_norm=[[2.0], [3.0]])
    assert post_batch(client, run_id, body).status_code == 200

    out = _heatmap(client, run_id, **params)

    assert out["step"] == step
    assert out["step"][0] == origin
    assert out["end"] == MAX_STEP
    last = [decode_float(v) for v in out["max"][0]]
    assert max(v for v in last if v is not None) == 3.0
    if params.get("start") is None:
        assert last[0] == (2.0 if len(step) == 2 else 3.0)


def test_heatmap_rollups_are_rebuilt_by_the_migration(settings, monkeypatch):
    monkeypatch.setattr(heatmap_query, "BLOCK_ROWS", 0)
    with TestClient(create_app(settings)) as client:
        run_id, _ = _random_run(client, seed=11)
        before = _heatmap(client, run_id, buckets=4)
    engine = create_db_engine(settings.database_url)
    try:
        with (
            engine.begin() as connection,
            as_file(files("gradwatch.server.store") / "alembic.ini") as ini,
        ):
            config = Config(str(ini))
            config.attributes["connection"] = connection
            command.downgrade(config, "0003")
            assert "rollups" not in inspect(connection).get_table_names()
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    with TestClient(create_app(settings)) as client:
        after = _heatmap(client, run_id, buckets=4)

    assert after == before
    assert any(v is not None for row in after["max"] for v in row)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_four_significant_digits_rounds_to_the_nearest_short_decimal(x):
    (rounded,) = heatmap_query.four_significant_digits(np.array([x])).tolist()

    if not math.isfinite(x) or x == 0:
        assert rounded == x or (math.isnan(x) and math.isnan(rounded))
        return
    # Reference: Python's correctly rounded decimal format, up to which neighbour a value
    # within a few ulps of a tie goes to.
    assert rounded == float(f"{x:.4g}") or abs(rounded - x) <= 10 ** (
        math.floor(math.log10(abs(x))) - 3
    ) * (0.5 + 1e-9)
    assert float(f"{rounded:.4g}") == rounded  # four digits, printed short
