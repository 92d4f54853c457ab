"""Free-form JSON (a run's ``config``): limits checked before anything is written, robust reads.

A ``config`` nested 256 levels deep used to be committed, answered 500, and broke every later
``GET /api/v1/runs`` page holding the run. Now every limit is a 422 naming the field and
nothing is stored; a config stored before the limits existed is left out of its own run's
reply (``config_error``) instead of breaking the list.
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from gradwatch.server.freeform import MAX_BYTES, MAX_DEPTH, MAX_ITEMS, MAX_STRING_CHARS
from gradwatch.server.store.db import Database, create_db_engine
from gradwatch.server.store.models import Run
from tests.server.wire import create_run

_EXAMPLES = 40


def _nested(depth):
    return "{}" if depth == 0 else '{"a":' * depth + "1" + "}" * depth


def _post_raw(client, config_json):
    run_id = str(uuid.uuid4())
    body = f'{{"run_id": "{run_id}", "name": "x", "config": {config_json}}}'
    response = client.post(
        "/api/v1/runs", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    return run_id, response


@pytest.mark.parametrize(
    ("depth", "field"),
    # Beyond the JSON parser's recursion limit (about 1000) the body itself is refused.
    [(MAX_DEPTH + 1, "config"), (256, "config"), (5000, "body")],
)
def test_free_json_deep_config_is_422_and_stores_nothing(client, depth, field):
    run_id, response = _post_raw(client, _nested(depth))

    assert response.status_code == 422, response.text
    reply = response.json()
    assert reply["code"] == "invalid"
    assert reply["detail"].startswith(f"{field}: ")
    assert "deep" in reply["detail"]
    listed = client.get("/api/v1/runs")
    assert listed.status_code == 200
    assert listed.json()["runs"] == []
    assert client.get(f"/api/v1/runs/{run_id}").status_code == 404


def test_free_json_config_at_the_depth_limit_round_trips(client):
    run_id, response = _post_raw(client, _nested(MAX_DEPTH - 1))

    assert response.status_code == 201, response.text
    assert client.get(f"/api/v1/runs/{run_id}").json()["config"] == json.loads(
        _nested(MAX_DEPTH - 1)
    )
    assert client.get("/api/v1/runs").status_code == 200


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"k": "x" * (MAX_STRING_CHARS + 1)}, "characters"),
        ({"x" * (MAX_STRING_CHARS + 1): 1}, "key of"),
        ({"k": list(range(MAX_ITEMS + 1))}, "members and elements"),
        ({f"k{i}": "x" * 9000 for i in range(MAX_BYTES // 9000 + 1)}, "bytes"),
        ({"k": "a\x00b"}, "NUL"),
    ],
    ids=["long-string", "long-key", "many-items", "too-large", "nul"],
)
def test_free_json_config_over_a_limit_is_422_naming_the_field(client, config, words):
    response = client.post(
        "/api/v1/runs", json={"run_id": str(uuid.uuid4()), "name": "x", "config": config}
    )

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "config"]
    assert response.json()["detail"].startswith("config")
    assert words in response.json()["detail"]
    assert client.get("/api/v1/runs").json()["runs"] == []


@pytest.mark.parametrize(
    ("literal", "words"),
    [
        ('{"k": 1e400}', "not a finite number"),
        ('{"k": "\\ud800"}', "lone surrogate"),
    ],
    ids=["overflowing-number", "lone-surrogate"],
)
def test_free_json_config_that_could_not_be_stored_is_422(client, literal, words):
    _, response = _post_raw(client, literal)

    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert client.get("/api/v1/runs").json()["runs"] == []


def test_free_json_stored_bad_config_never_breaks_the_list(client, database_url):
    good = create_run(client, name="good", config={"lr": 0.1})
    bad = create_run(client, name="bad")
    deep = json.loads(_nested(256))
    engine = create_db_engine(database_url)
    try:  # as an older server stored it, before the limits existed
        with Database(engine).write_session() as session, session.begin():
            session.execute(update(Run).where(Run.id == bad).values(config=deep))
    finally:
        engine.dispose()

    listed = client.get("/api/v1/runs")
    one = client.get(f"/api/v1/runs/{bad}")

    assert listed.status_code == 200, listed.text
    runs = {run["run_id"]: run for run in listed.json()["runs"]}
    assert runs[good]["config"] == {"lr": 0.1}
    assert runs[good]["config_error"] is None
    assert runs[bad]["config"] is None
    assert "deeper than" in runs[bad]["config_error"]
    assert one.status_code == 200
    assert one.json()["config_error"] == runs[bad]["config_error"]


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=40,
)


@st.composite
def _configs(draw):
    """Free-form JSON text: ordinary values, or ones wrapped deep, made long or wide."""
    value = {"c": draw(_json)}
    shape = draw(st.sampled_from(["plain", "deep", "long", "wide"]))
    if shape == "deep":
        for _ in range(draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 40))):
            value = {"d": value} if draw(st.booleans()) else {"l": [value]}
    elif shape == "long":
        value["s"] = "y" * draw(st.integers(MAX_STRING_CHARS - 2, MAX_STRING_CHARS + 2))
    elif shape == "wide":
        value["w"] = [0] * draw(st.integers(MAX_ITEMS - 10, MAX_ITEMS + 10))
    text = json.dumps(value)
    if draw(st.booleans()):  # escapes and literals json.dumps never writes
        text = (
            text[:-1]
            + draw(
                st.sampled_from(
                    [', "z": 1e999', ', "z": "\\u0000"', ', "z": "\\udc00"', ', "z": -0']
                )
            )
            + "}"
        )
    return text


@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=_configs())
def test_free_json_fuzz_never_5xx_and_every_stored_run_lists(client, config):
    run_id, response = _post_raw(client, config)

    assert response.status_code in (201, 422), response.text
    listed = client.get("/api/v1/runs", params={"limit": 500})
    assert listed.status_code == 200, listed.text
    stored = {run["run_id"]: run for run in listed.json()["runs"]}
    if response.status_code == 201:
        assert stored[run_id]["config"] == json.loads(config)
        assert client.get(f"/api/v1/runs/{run_id}").status_code == 200
    else:
        assert run_id not in stored
        assert response.json()["detail"].startswith("config")
