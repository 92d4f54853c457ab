"""Layers endpoint: layer order, latest and max gradient norm, non-finite totals."""

from __future__ import annotations

import uuid

from tests.server.wire import create_run, make_batch, post_batch


def test_layers_lists_in_order_with_latest_and_max(client):
    run_id = create_run(client)
    layers = ["conv/kernel", "bn", "head"]
    post_batch(
        client,
        run_id,
        make_batch(
            [0, 1],
            layers,
            grad_norm=[[1.0, 9.0, 0.5], [2.0, 3.0, float("nan")]],
            nonfinite=[[0, 0, 0], [0, 0, 7]],
        ),
    )
    post_batch(
        client,
        run_id,
        make_batch(
            [2, 3],
            layers,
            grad_norm=[[8.0, 1.0, float("inf")], [4.0, 2.0, 0.25]],
            nonfinite=[[0, 0, 1], [0, 0, 0]],
        ),
    )

    response = client.get(f"/api/v1/runs/{run_id}/layers")

    assert response.status_code == 200
    assert response.json() == {
        "run_id": run_id,
        "layers": [
            {
                "index": 0,
                "name": "conv/kernel",
                "latest_grad_norm": 4.0,
                "max_grad_norm": 8.0,
                "nonfinite_values": 0,
                "latest_weight_norm": None,
                "latest_update_ratio": None,
            },
            {
                "index": 1,
                "name": "bn",
                "latest_grad_norm": 2.0,
                "max_grad_norm": 9.0,
                "nonfinite_values": 0,
                "latest_weight_norm": None,
                "latest_update_ratio": None,
            },
            {
                "index": 2,
                "name": "head",
                "latest_grad_norm": 0.25,
                "max_grad_norm": "Infinity",
                "nonfinite_values": 8,
                "latest_weight_norm": None,
                "latest_update_ratio": None,
            },
        ],
    }


def test_layers_latest_nan_is_reported_as_nan(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0], ["a"], grad_norm=[[float("nan")]]))

    layer = client.get(f"/api/v1/runs/{run_id}/layers").json()["layers"][0]

    assert layer["latest_grad_norm"] == "NaN"
    assert layer["max_grad_norm"] == "NaN"


def test_layers_empty_before_first_batch(client):
    run_id = create_run(client)
    assert client.get(f"/api/v1/runs/{run_id}/layers").json() == {"run_id": run_id, "layers": []}


def test_layers_unknown_run_is_404(client):
    assert client.get(f"/api/v1/runs/{uuid.uuid4()}/layers").status_code == 404


def test_layers_carry_the_latest_measured_weight_norm_and_update_ratio(client):
    run_id = create_run(client)
    post_batch(
        client,
        run_id,
        make_batch(
            [0, 1, 2],
            ["a", "b"],
            weight_norm=[[2.0, 3.0], [None, None], [None, None]],
            update_ratio=[[0.25, 0.125], [None, None], [None, None]],
        ),
    )
    post_batch(
        client,
        run_id,
        make_batch([3], ["a", "b"], weight_norm=[[4.0, None]], update_ratio=[[0.5, None]]),
    )

    layers = client.get(f"/api/v1/runs/{run_id}/layers").json()["layers"]

    assert [(x["latest_weight_norm"], x["latest_update_ratio"]) for x in layers] == [
        (4.0, 0.5),
        (3.0, 0.125),
    ]
