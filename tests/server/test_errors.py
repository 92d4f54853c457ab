"""One error body everywhere, each status documented on its route, the HTTP details right.

Before: domain 422s sent ``detail`` as a string where the spec said an array; FastAPI's own 400
("There was an error parsing the body") had no ``code``; 400 was undocumented on the body
routes; a wrong ``Content-Type`` got 422 instead of 415; duplicate JSON keys were accepted
(last wins); a 405's ``Allow`` named one method.
"""

from __future__ import annotations

import gzip
import uuid

import pytest

from gradwatch.server.schemas import ErrorOut
from tests.server.wire import create_run, make_batch, post_batch

_JSON = {"Content-Type": "application/json"}


@pytest.fixture
def run_id(client):
    run_id = create_run(client)
    assert post_batch(client, run_id, make_batch([1, 2])).status_code == 200
    return run_id


def _cases(run_id):
    """(method, path template, path, request kwargs, status) of replies that are errors."""
    runs, run = "/api/v1/runs", "/api/v1/runs/{run_id}"
    batches, series = f"{run}/batches", f"{run}/series"
    detectors = "/api/v1/projects/{project}/detectors"
    here = {"run_id": run_id, "project": "default"}
    unknown = {"run_id": str(uuid.uuid4()), "project": "default"}
    gz = {**_JSON, "Content-Encoding": "gzip"}
    return [
        ("GET", series, here, {"params": {"metric": "grad_norm"}}, 422),  # invalid_query
        ("GET", series, here, {"params": {"metric": "nope"}}, 422),  # invalid
        ("GET", series, here, {"params": {"metric": "grad_norm", "layer": "x"}}, 404),
        ("GET", run, unknown, {}, 404),
        ("POST", runs, here, {"content": b"\xff\xfe{", "headers": _JSON}, 422),  # not UTF-8
        ("POST", runs, here, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
        ("POST", runs, here, {"content": b"{}", "headers": {}}, 415),
        (
            "POST",
            runs,
            here,
            {"content": b"{}", "headers": {**_JSON, "Content-Encoding": "br"}},
            415,
        ),
        ("POST", runs, here, {"content": b"garbage", "headers": gz}, 400),
        ("PATCH", run, here, {"content": b"garbage", "headers": gz}, 400),
        ("PATCH", run, here, {"content": b"x", "headers": {"Content-Type": "text/csv"}}, 415),
        ("PUT", detectors, here, {"content": b"garbage", "headers": gz}, 400),
        ("PUT", detectors, here, {"content": b"{}", "headers": {"Content-Type": "form"}}, 415),
        ("POST", batches, here, {"content": b"garbage", "headers": gz}, 400),
        ("POST", batches, here, {"content": b"[]", "headers": {"Content-Type": "x/y"}}, 415),
        ("POST", batches, unknown, {"json": make_batch([0])}, 404),
        ("POST", batches, here, {"json": make_batch([0, 2])}, 409),
        ("POST", batches, here, {"json": make_batch([5], global_norm=[1e300])}, 422),
    ]


def test_errors_every_reply_has_one_shape_and_is_documented(client, run_id):
    spec = client.get("/openapi.json").json()
    error_schema = spec["components"]["schemas"]["ErrorOut"]
    assert error_schema["properties"]["detail"]["type"] == "string"
    assert set(error_schema["required"]) == {"code", "detail"}

    for method, template, values, kwargs, status in _cases(run_id):
        response = client.request(method, template.format(**values), **kwargs)

        where = f"{method} {template} {kwargs}"
        assert response.status_code == status, (where, response.text)
        reply = ErrorOut.model_validate(response.json())  # code and detail: str
        assert reply.code, where
        assert reply.detail, where
        documented = spec["paths"][template][method.lower()]["responses"]
        assert str(status) in documented, where
        assert documented[str(status)]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorOut"
        }, where


def test_errors_domain_and_validation_422_share_the_shape(client, run_id):
    domain = client.get(f"/api/v1/runs/{run_id}/series", params={"metric": "grad_norm"})
    validation = client.get(f"/api/v1/runs/{run_id}/series", params={"metric": "nope"})

    assert domain.json()["code"] == "invalid_query"
    assert domain.json()["detail"].startswith("layer: ")
    assert validation.json()["code"] == "invalid"
    assert validation.json()["detail"].startswith("metric: ")
    assert validation.json()["errors"][0]["loc"] == ["query", "metric"]
    assert validation.json()["error_count"] == 1


def test_errors_body_that_is_not_json_text_has_a_code(client):
    """FastAPI answered 400 "There was an error parsing the body" without a ``code``."""
    response = client.post("/api/v1/runs", content=b"\xff\xfe\x00{", headers=_JSON)

    assert response.status_code == 422
    assert response.json()["code"] == "invalid"
    assert response.json()["errors"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "body",
    [
        b'{"run_id": "%s", "name": "a", "name": "b"}',
        b'{"run_id": "%s", "name": "a", "config": {"k": 1, "k": 2}}',
    ],
    ids=["top-level", "nested"],
)
def test_errors_duplicate_json_keys_are_422(client, body):
    content = body.replace(b"%s", str(uuid.uuid4()).encode())

    response = client.post("/api/v1/runs", content=content, headers=_JSON)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["type"] == "json_duplicate_key"
    assert "more than once" in response.json()["detail"]
    assert client.get("/api/v1/runs").json()["runs"] == []


def test_errors_duplicate_key_in_a_gzip_batch_is_422(client, run_id):
    raw = b'{"schema": 1, "schema": 1}'
    response = client.post(
        f"/api/v1/runs/{run_id}/batches",
        content=gzip.compress(raw),
        headers={**_JSON, "Content-Encoding": "gzip"},
    )
    assert response.status_code == 422
    assert "'schema'" in response.json()["detail"]


def test_errors_json_media_types_are_accepted(client):
    for media_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.post(
            "/api/v1/runs",
            content=b'{"run_id": "%s", "name": "x"}' % str(uuid.uuid4()).encode(),
            headers={"Content-Type": media_type},
        )
        assert response.status_code == 201, (media_type, response.text)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/v1/runs", "GET, POST"),
        ("PUT", "/api/v1/runs/{run_id}", "GET, PATCH"),
        ("GET", "/api/v1/runs/{run_id}/batches", "POST"),
        ("POST", "/api/v1/projects/default/detectors", "GET, PUT"),
    ],
)
def test_errors_405_allow_lists_every_method_of_the_path(client, run_id, method, path, allow):
    response = client.request(method, path.format(run_id=run_id))

    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {"code": "method_not_allowed", "detail": "Method Not Allowed"}


def test_errors_unknown_path_has_the_shape(client):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
