"""/healthz and the OpenAPI docs."""

from __future__ import annotations

from gradwatch.server.store.db import Database, create_db_engine


def test_health_reports_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_health_reports_unavailable_database(client, tmp_path):
    broken = create_db_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    client.app.state.database = Database(broken)
    try:
        response = client.get("/healthz")
    finally:
        broken.dispose()

    assert response.status_code == 503
    assert response.json() == {"status": "error", "database": "unavailable"}


def test_health_database_errors_elsewhere_are_503(client, tmp_path):
    broken = create_db_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    client.app.state.database = Database(broken)
    try:
        response = client.get("/api/v1/runs")
    finally:
        broken.dispose()

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


def test_health_openapi_documents_the_api(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/batches",
        "/api/v1/runs/{run_id}/layers",
        "/api/v1/runs/{run_id}/series",
        "/healthz",
    } <= set(paths)
    batch_body = paths["/api/v1/runs/{run_id}/batches"]["post"]["requestBody"]
    assert "StepBatch" in str(batch_body)
