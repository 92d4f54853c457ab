"""Tokens, scopes, projects, open mode and the per-token rate limit."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from gradwatch.server.auth import (
    InsecureBindError,
    RateLimiter,
    TokenScope,
    create_token,
    is_loopback,
    require_auth_for_bind,
    revoke_token,
)
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.errors import RateLimitedError
from gradwatch.server.store.db import Database, create_db_engine
from tests.server.wire import make_batch


@pytest.fixture
def database(database_url):
    engine = create_db_engine(database_url)
    yield Database(engine)
    engine.dispose()


@pytest.fixture
def make_token(database):
    def make(project, *scopes):
        with database.write_session() as session:
            return create_token(session, project, scopes, "test", datetime.now(UTC)).token

    return make


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def _create_run(client, token, project="vision"):
    run_id = str(uuid.uuid4())
    response = client.post(
        "/api/v1/runs",
        json={"run_id": run_id, "name": "r", "project": project},
        headers=_bearer(token),
    )
    assert response.status_code == 201, response.text
    return run_id


def test_auth_open_mode_needs_no_token(client):
    assert client.get("/api/v1/runs").status_code == 200


def test_auth_first_token_makes_tokens_required(client, make_token):
    assert client.get("/api/v1/runs").status_code == 200
    make_token("vision", TokenScope.READ)

    response = client.get("/api/v1/runs")

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthenticated"
    assert "gradwatch token create" in response.json()["detail"]


def test_auth_ingest_and_read_tokens_round_trip(client, make_token):
    ingest = make_token("vision", TokenScope.INGEST)
    read = make_token("vision", TokenScope.READ)
    run_id = _create_run(client, ingest)
    body = make_batch([0, 1])

    posted = client.post(
        f"/api/v1/runs/{run_id}/batches",
        json=body,
        headers=_bearer(ingest),
    )
    patched = client.patch(
        f"/api/v1/runs/{run_id}", json={"status": "finished"}, headers=_bearer(ingest)
    )
    series = client.get(
        f"/api/v1/runs/{run_id}/series", params={"metric": "global_norm"}, headers=_bearer(read)
    )

    assert posted.status_code == 200, posted.text
    assert patched.status_code == 200
    assert series.json()["step"] == [0, 1]
    assert client.get(f"/api/v1/runs/{run_id}", headers=_bearer(read)).status_code == 200
    assert client.get(f"/api/v1/runs/{run_id}/layers", headers=_bearer(read)).status_code == 200


@pytest.mark.parametrize(
    "mangle",
    [
        lambda token: token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        lambda token: "gw_000000000000_" + token.split("_", 2)[2],
        lambda token: "not-a-token",
        lambda token: "gw__",
        lambda token: token + "x",
    ],
    ids=["wrong-secret", "unknown-key", "garbage", "empty-parts", "longer"],
)
def test_auth_invalid_token_is_401(client, make_token, mangle):
    token = make_token("vision", TokenScope.READ)
    response = client.get("/api/v1/runs", headers=_bearer(mangle(token)))
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"


def test_auth_revoked_token_is_401(client, make_token, database):
    token = make_token("vision", TokenScope.READ)
    assert client.get("/api/v1/runs", headers=_bearer(token)).status_code == 200
    with database.write_session() as session:
        assert revoke_token(session, token.split("_")[1], datetime.now(UTC))

    assert client.get("/api/v1/runs", headers=_bearer(token)).status_code == 401
    # Revoking every token does not reopen the server.
    assert client.get("/api/v1/runs").status_code == 401


def test_auth_wrong_scope_is_403(client, make_token):
    read = make_token("vision", TokenScope.READ)
    ingest = make_token("vision", TokenScope.INGEST)
    run_id = _create_run(client, ingest)

    create = client.post(
        "/api/v1/runs",
        json={"run_id": str(uuid.uuid4()), "name": "r", "project": "vision"},
        headers=_bearer(read),
    )
    batch = post_batch_with(client, run_id, make_batch([0]), read)
    query = client.get(
        f"/api/v1/runs/{run_id}/series", params={"metric": "loss"}, headers=_bearer(ingest)
    )

    for response in (create, batch, query):
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "forbidden"
        assert "scope" in response.json()["detail"]


def post_batch_with(client, run_id, body, token):
    return client.post(f"/api/v1/runs/{run_id}/batches", json=body, headers=_bearer(token))


def test_auth_other_project_is_403(client, make_token):
    vision = make_token("vision", TokenScope.INGEST, TokenScope.READ)
    nlp = make_token("nlp", TokenScope.INGEST, TokenScope.READ)
    vision_run = _create_run(client, vision, "vision")
    nlp_run = _create_run(client, nlp, "nlp")

    responses = [
        client.post(
            "/api/v1/runs",
            json={"run_id": str(uuid.uuid4()), "name": "r", "project": "nlp"},
            headers=_bearer(vision),
        ),
        # Re-creating another project's run id does not reveal it.
        client.post(
            "/api/v1/runs",
            json={"run_id": nlp_run, "name": "r", "project": "vision"},
            headers=_bearer(vision),
        ),
        post_batch_with(client, nlp_run, make_batch([0]), vision),
        client.patch(f"/api/v1/runs/{nlp_run}", json={"status": "failed"}, headers=_bearer(vision)),
        client.get(f"/api/v1/runs/{nlp_run}", headers=_bearer(vision)),
        client.get(f"/api/v1/runs/{nlp_run}/layers", headers=_bearer(vision)),
        client.get(
            f"/api/v1/runs/{nlp_run}/series", params={"metric": "loss"}, headers=_bearer(vision)
        ),
        client.get("/api/v1/runs", params={"project": "nlp"}, headers=_bearer(vision)),
    ]

    for response in responses:
        assert response.status_code == 403, response.text
        assert "project" in response.json()["detail"]
    listed = client.get("/api/v1/runs", headers=_bearer(vision)).json()["runs"]
    assert [run["run_id"] for run in listed] == [vision_run]
    assert client.get(f"/api/v1/runs/{nlp_run}", headers=_bearer(nlp)).json()["status"] == (
        "running"
    )


def test_auth_unknown_run_is_still_404(client, make_token):
    read = make_token("vision", TokenScope.READ)
    response = client.get(f"/api/v1/runs/{uuid.uuid4()}", headers=_bearer(read))
    assert response.status_code == 404


def test_auth_health_metrics_and_docs_stay_open(client, make_token):
    make_token("vision", TokenScope.READ)
    for path in ("/healthz", "/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


def test_auth_tokens_are_stored_hashed(make_token, database):
    token = make_token("vision", TokenScope.INGEST)
    with database.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT * FROM api_tokens").all()
    stored = " ".join(str(value) for value in rows[0])
    assert token not in stored
    assert token.split("_", 2)[2] not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in stored


def test_auth_required_without_any_token_is_401(database_url):
    settings = Settings(database_url=database_url, require_auth=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/v1/runs").status_code == 401
        assert client.get("/healthz").status_code == 200


def test_auth_rate_limit_is_429_with_retry_after(database_url, make_token):
    settings = Settings(database_url=database_url, rate_limit_per_second=0.001, rate_limit_burst=2)
    first = make_token("vision", TokenScope.READ)
    second = make_token("vision", TokenScope.READ)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        statuses = [client.get("/api/v1/runs", headers=_bearer(first)) for _ in range(3)]
        elapsed = time.monotonic() - started
        other = client.get("/api/v1/runs", headers=_bearer(second))

    assert [response.status_code for response in statuses] == [200, 200, 429]
    # An empty bucket refills one request in 1000 s, less what refilled while the three
    # requests ran (more than a second on a loaded CI machine).
    assert 1000 - math.ceil(elapsed) <= int(statuses[2].headers["retry-after"]) <= 1000
    assert statuses[2].json()["code"] == "rate_limited"
    assert other.status_code == 200


def test_auth_rate_limit_counts_rejected_batches(database_url, make_token):
    settings = Settings(database_url=database_url, rate_limit_per_second=0.001, rate_limit_burst=1)
    token = make_token("vision", TokenScope.INGEST)
    with TestClient(create_app(settings)) as client:
        run_id = str(uuid.uuid4())
        client.post(
            "/api/v1/runs",
            json={"run_id": run_id, "name": "r", "project": "vision"},
            headers=_bearer(token),
        )
        response = post_batch_with(client, run_id, make_batch([0]), token)
        metrics = client.get("/metrics").text
    assert response.status_code == 429
    assert 'gradwatch_ingest_rejected_total{reason="rate_limited"} 1.0' in metrics


def test_rate_limiter_refills_at_rate():
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("a")
    with pytest.raises(RateLimitedError) as raised:
        limiter.acquire("a")
    assert raised.value.retry_after_seconds == 1
    limiter.acquire("b")

    now[0] += 0.5  # one request's worth at 2/s
    limiter.acquire("a")
    with pytest.raises(RateLimitedError):
        limiter.acquire("a")
    now[0] += 100  # refills to the burst, not beyond
    for _ in range(3):
        limiter.acquire("a")
    with pytest.raises(RateLimitedError):
        limiter.acquire("a")


def test_rate_limiter_zero_rate_is_off():
    limiter = RateLimiter(rate=0, burst=1, clock=lambda: 0.0)
    for _ in range(1000):
        limiter.acquire("a")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.org", False),
    ],
)
def test_is_loopback_recognises_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_require_auth_for_bind_refuses_open_non_loopback():
    assert require_auth_for_bind("127.0.0.1", has_tokens=False, insecure=False) is False
    assert require_auth_for_bind("127.0.0.1", has_tokens=True, insecure=False) is False
    assert require_auth_for_bind("0.0.0.0", has_tokens=True, insecure=False) is True
    assert require_auth_for_bind("0.0.0.0", has_tokens=False, insecure=True) is False
    with pytest.raises(InsecureBindError, match="--insecure"):
        require_auth_for_bind("0.0.0.0", has_tokens=False, insecure=False)


def test_auth_over_real_http_with_gzip_batches(settings, make_token):
    token = make_token("vision", TokenScope.INGEST, TokenScope.READ)
    body = gzip.compress(json.dumps(make_batch([0, 1, 2])).encode())
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    with (
        EmbeddedServer(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as anonymous,
        httpx.Client(base_url=server.url, timeout=30, headers=_bearer(token)) as agent,
    ):
        run_id = str(uuid.uuid4())
        run = {"run_id": run_id, "name": "r", "project": "vision"}
        refused = anonymous.post("/api/v1/runs", json=run)
        created = agent.post("/api/v1/runs", json=run)
        stored = agent.post(f"/api/v1/runs/{run_id}/batches", content=body, headers=headers)
        anonymous_batch = anonymous.post(
            f"/api/v1/runs/{run_id}/batches", content=body, headers=headers
        )

    assert refused.status_code == 401
    assert created.status_code == 201
    assert stored.status_code == 200
    assert stored.json()["stored_samples"] == 3 * (5 + 2 * 2)
    assert anonymous_batch.status_code == 401
