"""Runs API: creation idempotency, get, status changes, listing filters and keyset paging."""

from __future__ import annotations

import uuid

import pytest

from tests.server.wire import create_run, make_batch, post_batch


def test_create_run_is_idempotent(client):
    run_id = str(uuid.uuid4())
    body = {"run_id": run_id, "name": "resnet", "project": "vision", "config": {"lr": 0.1}}

    first = client.post("/api/v1/runs", json=body)
    again = client.post("/api/v1/runs", json={**body, "name": "other name"})

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == first.json()
    created = first.json()
    assert created["run_id"] == run_id
    assert created["name"] == "resnet"
    assert created["project"] == "vision"
    assert created["status"] == "running"
    assert created["config"] == {"lr": 0.1}
    assert created["num_steps"] == 0
    assert created["num_layers"] == 0
    assert created["last_step"] is None
    assert created["max_global_norm"] is None
    assert created["dropped_batches"] == {}


def test_create_run_defaults_project(client):
    run_id = str(uuid.uuid4())
    response = client.post("/api/v1/runs", json={"run_id": run_id, "name": "x"})
    assert response.status_code == 201
    assert response.json()["project"] == "default"


def test_create_run_normalises_uuid(client):
    run_id = uuid.uuid4()
    response = client.post("/api/v1/runs", json={"run_id": str(run_id).upper(), "name": "x"})
    assert response.json()["run_id"] == str(run_id)
    assert client.get(f"/api/v1/runs/{run_id}").status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": 5}, "name"),
        ({"project": "has space"}, "project"),
        ({"project": ""}, "project"),
        ({"run_id": "not-a-uuid"}, "run_id"),
        ({"config": [1, 2]}, "config"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_create_run_rejects_bad_fields(client, body, field):
    response = client.post("/api/v1/runs", json={"run_id": str(uuid.uuid4()), "name": "x", **body})
    assert response.status_code == 422
    assert any(field in error["loc"] for error in response.json()["errors"])
    assert client.get("/api/v1/runs").json()["runs"] == []


def test_get_run_unknown_is_404(client):
    response = client.get(f"/api/v1/runs/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["code"] == "run_not_found"


def test_get_run_reports_totals(client):
    run_id = create_run(client)
    body = make_batch(
        [0, 1, 2, 3],
        global_norm=[1.0, 2.0, float("inf"), 0.5],
        clip_coef=[1.0, 0.5, 0.0, 1.0],
        skipped=[False, False, True, False],
        nonfinite=[[0, 0], [0, 0], [2, 5], [0, 1]],
        dropped_batches={"queue_full": 3},
    )
    assert post_batch(client, run_id, body).status_code == 200

    run = client.get(f"/api/v1/runs/{run_id}").json()

    assert run["num_steps"] == 4
    assert run["num_layers"] == 2
    assert run["last_step"] == 3
    assert run["clipped_steps"] == 2
    assert run["skipped_steps"] == 1
    assert run["nonfinite_steps"] == 2
    assert run["nonfinite_values"] == 8
    assert run["max_global_norm"] == "Infinity"
    assert run["dropped_batches"] == {"queue_full": 3}
    assert run["last_ingest_at"] is not None


def test_get_run_keeps_latest_dropped_batches(client):
    run_id = create_run(client)
    later = make_batch([10, 11], dropped_batches={"queue_full": 7, "spool_full": 1})
    earlier = make_batch([0, 1], dropped_batches={"queue_full": 2})
    post_batch(client, run_id, later)
    post_batch(client, run_id, earlier)

    run = client.get(f"/api/v1/runs/{run_id}").json()

    assert run["dropped_batches"] == {"queue_full": 7, "spool_full": 1}
    assert run["last_step"] == 11
    assert run["num_steps"] == 4


def test_patch_run_sets_status(client):
    run_id = create_run(client)

    finished = client.patch(f"/api/v1/runs/{run_id}", json={"status": "finished"})
    failed = client.patch(f"/api/v1/runs/{run_id}", json={"status": "failed"})

    assert finished.status_code == 200
    assert finished.json()["status"] == "finished"
    assert failed.json()["status"] == "failed"
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "failed"
    assert failed.json()["updated_at"] >= finished.json()["updated_at"]


@pytest.mark.parametrize("body", [{"status": "done"}, {}, {"status": "finished", "x": 1}])
def test_patch_run_rejects_bad_status(client, body):
    run_id = create_run(client)
    response = client.patch(f"/api/v1/runs/{run_id}", json=body)
    assert response.status_code == 422
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "running"


def test_patch_run_unknown_is_404(client):
    response = client.patch(f"/api/v1/runs/{uuid.uuid4()}", json={"status": "finished"})
    assert response.status_code == 404


def test_list_runs_filters(client):
    a = create_run(client, name="ResNet baseline", project="vision")
    b = create_run(client, name="resnet-wide", project="vision")
    c = create_run(client, name="bert", project="nlp")
    client.patch(f"/api/v1/runs/{b}", json={"status": "finished"})

    def ids(**params):
        response = client.get("/api/v1/runs", params=params)
        assert response.status_code == 200, response.text
        return [run["run_id"] for run in response.json()["runs"]]

    assert ids() == [c, b, a]
    assert ids(project="vision") == [b, a]
    assert ids(project="nlp") == [c]
    assert ids(status="finished") == [b]
    assert ids(status="running", project="vision") == [a]
    assert ids(name="RESNET") == [b, a]
    assert ids(name="net-w") == [b]
    assert ids(name="%") == []
    assert ids(project="none") == []


def test_list_runs_writes_non_finite_floats_as_strings(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1], global_norm=[float("nan"), float("inf")]))

    response = client.get("/api/v1/runs")

    assert response.status_code == 200
    assert '"max_global_norm":"Infinity"' in response.text
    assert response.json()["runs"][0]["nonfinite_steps"] == 2


def test_list_runs_pages_by_keyset(client):
    created = [create_run(client, name=f"run-{i}") for i in range(7)]
    newest_first = created[::-1]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/v1/runs", params=params).json()
        seen.extend(run["run_id"] for run in page["runs"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # A run created between pages must not shift the pages already handed out.
        create_run(client, name="late")

    assert pages == 3
    assert seen == newest_first


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"cursor": "garbage!"},
        {"status": "done"},
        {"name": "a\x00b"},
        {"project": "has space"},
    ],
)
def test_list_runs_rejects_bad_parameters(client, params):
    response = client.get("/api/v1/runs", params=params)
    assert response.status_code == 422
