"""The caller is checked before any body is read; failed tokens are rate-limited per address.

Before, a body was read, gunzipped and parsed before the token was looked at: an
unauthenticated 31 KiB gzip body decoding to 31 MiB cost a second of CPU and 185 MiB, and a
bad body answered 400/422 instead of 401. The server's own counters
(``gradwatch_request_body_read_bytes_total``, ``..._decoded_bytes_total``) show that nothing
of a refused body is read or decoded.
"""

from __future__ import annotations

import gzip
import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.app import create_app
from gradwatch.server.auth import TokenScope, create_token
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.store.db import Database, create_db_engine
from gradwatch.wire.binary import MEDIA_TYPE
from tests.server.wire import make_batch

_GZIP = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
_BINARY = {"Content-Type": MEDIA_TYPE}


@pytest.fixture
def token(database_url):
    engine = create_db_engine(database_url)
    try:
        with Database(engine).write_session() as session:
            scopes = (TokenScope.INGEST, TokenScope.READ)
            return create_token(session, "vision", scopes, "test", datetime.now(UTC)).token
    finally:
        engine.dispose()


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def _body_bytes(client):
    families = {
        family.name: family
        for family in text_string_to_metric_families(client.get("/metrics").text)
    }
    return tuple(
        families[name].samples[0].value
        for name in ("gradwatch_request_body_read_bytes", "gradwatch_request_body_decoded_bytes")
    )


def _create_run(client, token):
    run_id = str(uuid.uuid4())
    response = client.post(
        "/api/v1/runs",
        json={"run_id": run_id, "name": "r", "project": "vision"},
        headers=_bearer(token),
    )
    assert response.status_code == 201, response.text
    return run_id


def _bodies(max_body_bytes):
    bomb = gzip.compress(b'{"schema": 1, "pad": "' + b"0" * (4 * max_body_bytes) + b'"}')
    return {
        "gzip-bomb": (bomb, _GZIP),
        "oversized": (b"[" * (max_body_bytes + 1), {"Content-Type": "application/json"}),
        "broken-gzip": (b"not gzip at all", _GZIP),
        "malformed-json": (b'{"schema": 1, "schema": ', {"Content-Type": "application/json"}),
        "wrong-type": (b"<xml/>", {"Content-Type": "application/xml"}),
        "binary-bomb": (
            gzip.compress(
                b"\xc6" + (4 * max_body_bytes).to_bytes(4, "big") + b"\0" * 4 * max_body_bytes
            ),
            {**_BINARY, "Content-Encoding": "gzip"},
        ),
        "malformed-binary": (b"\xc1\xc1", _BINARY),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "gzip-bomb",
        "oversized",
        "broken-gzip",
        "malformed-json",
        "wrong-type",
        "binary-bomb",
        "malformed-binary",
    ],
)
@pytest.mark.parametrize("credentials", ["none", "invalid"])
def test_auth_first_refused_body_is_401_without_being_read(database_url, token, kind, credentials):
    settings = Settings(database_url=database_url, max_body_bytes=64 * 1024)
    content, headers = _bodies(settings.max_body_bytes)[kind]
    if credentials == "invalid":
        headers = {**headers, **_bearer(token[:-4] + "AAAA")}
    with TestClient(create_app(settings)) as client:
        run_id = _create_run(client, token)
        before = _body_bytes(client)

        batch = client.post(f"/api/v1/runs/{run_id}/batches", content=content, headers=headers)
        run = client.post("/api/v1/runs", content=content, headers=headers)
        patch = client.patch(f"/api/v1/runs/{run_id}", content=content, headers=headers)

        for response in (batch, run, patch):
            assert response.status_code == 401, response.text
            assert response.json()["code"] == "unauthenticated"
        assert _body_bytes(client) == before


def test_auth_first_authenticated_bomb_is_decoded_only_up_to_the_cap(database_url, token):
    settings = Settings(database_url=database_url, max_body_bytes=64 * 1024)
    content, headers = _bodies(settings.max_body_bytes)["gzip-bomb"]
    with TestClient(create_app(settings)) as client:
        run_id = _create_run(client, token)
        read, decoded = _body_bytes(client)

        response = client.post(
            f"/api/v1/runs/{run_id}/batches", content=content, headers={**headers, **_bearer(token)}
        )

        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"
        # Read in full (it is small), decoded no further than the cap: never counted as decoded.
        assert _body_bytes(client) == (read + len(content), decoded)


def test_auth_first_unknown_run_of_another_project_is_403_before_the_body(database_url, token):
    engine = create_db_engine(database_url)
    try:
        with Database(engine).write_session() as session:
            other = create_token(session, "nlp", (TokenScope.INGEST,), "t", datetime.now(UTC))
    finally:
        engine.dispose()
    settings = Settings(database_url=database_url)
    with TestClient(create_app(settings)) as client:
        run_id = _create_run(client, token)
        before = _body_bytes(client)

        response = client.post(
            f"/api/v1/runs/{run_id}/batches",
            content=b"{not json",
            headers={"Content-Type": "application/json", **_bearer(other.token)},
        )

        assert response.status_code == 403
        assert _body_bytes(client) == before


def test_auth_first_failed_tokens_are_rate_limited_per_address(database_url, token):
    settings = Settings(
        database_url=database_url, auth_failure_rate_per_second=0.001, auth_failure_burst=3
    )
    wrong = _bearer(token[:-4] + "AAAA")
    app = create_app(settings)
    with TestClient(app) as client:
        statuses = [client.get("/api/v1/runs", headers=wrong).status_code for _ in range(5)]
        # The address is over its budget: even the right token waits (it is not checked).
        blocked = client.get("/api/v1/runs", headers=_bearer(token))
        # Requests without a token are not failed authentications.
        anonymous = client.get("/api/v1/runs")
    with TestClient(app, client=("10.0.0.2", 5000)) as elsewhere:
        other_address = elsewhere.get("/api/v1/runs", headers=_bearer(token))

    assert statuses == [401, 401, 401, 429, 429]
    assert blocked.status_code == 429
    assert blocked.json()["code"] == "rate_limited"
    assert "failed authentications" in blocked.json()["detail"]
    assert int(blocked.headers["retry-after"]) >= 1
    assert anonymous.status_code == 401
    assert other_address.status_code == 200


def test_auth_first_over_real_http(database_url, token):
    """Through uvicorn: a refused gzip bomb is 401 and nothing of it is read."""
    settings = Settings(database_url=database_url, max_body_bytes=64 * 1024)
    content, headers = _bodies(settings.max_body_bytes)["gzip-bomb"]
    body = gzip.compress(json.dumps(make_batch([0, 1])).encode())
    with (
        EmbeddedServer(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        run_id = _create_run(http, token)
        before = _body_bytes(http)
        refused = http.post(f"/api/v1/runs/{run_id}/batches", content=content, headers=headers)
        after = _body_bytes(http)
        stored = http.post(
            f"/api/v1/runs/{run_id}/batches", content=body, headers={**_GZIP, **_bearer(token)}
        )

    assert refused.status_code == 401
    assert after == before
    assert stored.status_code == 200
