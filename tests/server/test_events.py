"""Detector events through the REST API: stored on ingest, merged, paged, filtered, summarised,
kept across restarts and consistent whichever app (worker) ingests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from tests.server.wire import create_run, make_batch, post_batch

_LAYERS = ("encoder/dense", "encoder/dense_1", "head")
_STEPS = 600
_BATCH = 50
_SPIKE_STEP = 400
_NAN_STEP = 450


def _stream(seed: int = 0) -> dict[str, np.ndarray]:
    """A healthy lognormal stream with a 100× spike of the global norm and of ``head`` at
    ``_SPIKE_STEP``, and NaN gradients in ``encoder/dense`` at ``_NAN_STEP``."""
    rng = np.random.default_rng(seed)
    grad = np.exp(rng.normal(0.0, 0.1, size=(_STEPS, len(_LAYERS))))
    grad[_SPIKE_STEP, 2] *= 100.0
    grad[_NAN_STEP, 0] = np.nan
    nonfinite = np.zeros((_STEPS, len(_LAYERS)), dtype=np.int64)
    nonfinite[_NAN_STEP, 0] = 7
    global_norm = np.sqrt(np.nansum(grad**2, axis=1))
    global_norm[_NAN_STEP] = np.nan
    return {"grad_norm": grad, "nonfinite": nonfinite, "global_norm": global_norm}


def _batch(stream: dict[str, np.ndarray], start: int, stop: int) -> dict:
    steps = list(range(start, stop))
    return make_batch(
        steps,
        _LAYERS,
        grad_norm=stream["grad_norm"][start:stop].tolist(),
        global_norm=stream["global_norm"][start:stop].tolist(),
        nonfinite=stream["nonfinite"][start:stop].tolist(),
    )


def _ingest(client: TestClient, run_id: str, stream: dict, start: int = 0, stop: int = _STEPS):
    for first in range(start, stop, _BATCH):
        response = post_batch(client, run_id, _batch(stream, first, min(first + _BATCH, stop)))
        assert response.status_code == 200, response.text


def _events(client: TestClient, run_id: str, **params) -> list[dict]:
    """Every event of a run, following the cursor with small pages."""
    found: list[dict] = []
    cursor = None
    for _ in range(100):
        query = {"limit": 2, **params, **({} if cursor is None else {"cursor": cursor})}
        response = client.get(f"/api/v1/runs/{run_id}/events", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found
    raise AssertionError("paging did not end")


def _comparable(events: list[dict]) -> list[tuple]:
    return sorted(
        (e["rule"], e["layer"] or "", e["severity"], e["first_step"], e["last_step"], e["count"])
        for e in events
    )


@pytest.fixture
def ingested(client) -> Iterator[tuple[TestClient, str]]:
    run_id = create_run(client, project="vision")
    _ingest(client, run_id, _stream())
    return client, run_id


def test_events_explosion_and_nonfinite_at_their_steps(ingested):
    client, run_id = ingested
    events = _events(client, run_id)

    explosions = {e["layer"]: e for e in events if e["rule"] == "explosion"}
    assert set(explosions) == {None, "head"}
    for event in explosions.values():
        assert event["first_step"] == event["last_step"] == _SPIKE_STEP
        assert event["count"] == 1
        assert event["value"] > 20 * event["baseline"]
    assert explosions["head"]["severity"] == "critical"  # 100× its running median

    nonfinite = {e["layer"]: e for e in events if e["rule"] == "nonfinite"}
    assert set(nonfinite) == {None, "encoder/dense"}
    assert nonfinite["encoder/dense"]["first_step"] == _NAN_STEP
    assert nonfinite["encoder/dense"]["value"] == 7
    assert nonfinite["encoder/dense"]["severity"] == "critical"
    assert {e["rule"] for e in events} == {"explosion", "nonfinite"}


def test_events_newest_first_and_filters(ingested):
    client, run_id = ingested
    events = _events(client, run_id)
    keys = [(e["first_step"], e["id"]) for e in events]
    assert keys == sorted(keys, reverse=True)

    assert {e["rule"] for e in _events(client, run_id, rule="nonfinite")} == {"nonfinite"}
    both = _events(client, run_id, rule=["nonfinite", "explosion"])
    assert _comparable(both) == _comparable(events)
    head = _events(client, run_id, layer="head")
    assert [(e["rule"], e["layer"]) for e in head] == [("explosion", "head")]
    run_level = _events(client, run_id, layer="")
    assert {e["layer"] for e in run_level} == {None}
    assert _events(client, run_id, start=_NAN_STEP + 1) == []
    assert {e["first_step"] for e in _events(client, run_id, end=_SPIKE_STEP)} == {_SPIKE_STEP}
    critical = _events(client, run_id, severity="critical")
    assert critical
    assert all(e["severity"] == "critical" for e in critical)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"rule": "boom"}, "rule"),
        ({"severity": "fatal"}, "severity"),
        ({"limit": 0}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"start": -1}, "start"),
    ],
)
def test_events_bad_query_is_4xx_naming_the_parameter(ingested, params, fragment):
    client, run_id = ingested
    response = client.get(f"/api/v1/runs/{run_id}/events", params=params)
    assert 400 <= response.status_code < 500
    assert fragment in response.text


def test_events_unknown_run_is_404(client):
    run_id = "00000000-0000-4000-8000-000000000000"
    assert client.get(f"/api/v1/runs/{run_id}/events").status_code == 404
    assert client.get(f"/api/v1/runs/{run_id}/health").status_code == 404


def test_events_sustained_explosion_merges_across_batches(client):
    run_id = create_run(client)
    stream = _stream()
    stream["grad_norm"][_SPIKE_STEP:] = stream["grad_norm"][:1]  # calm after the spike…
    stream["grad_norm"][_SPIKE_STEP - 5 : _SPIKE_STEP + 5, 2] *= 1e4  # …a burst across a batch edge
    stream["grad_norm"][_NAN_STEP, 0] = 1.0
    stream["nonfinite"][:] = 0
    stream["global_norm"] = np.sqrt((stream["grad_norm"] ** 2).sum(axis=1))
    _ingest(client, run_id, stream)

    head = _events(client, run_id, rule="explosion", layer="head")
    assert len(head) == 1
    assert head[0]["first_step"] == _SPIKE_STEP - 5
    assert head[0]["count"] >= 1
    detections = client.get(f"/api/v1/runs/{run_id}/health").json()["detections"]
    assert sum(detections["explosion"].values()) >= head[0]["count"]


def test_events_resend_stores_no_new_events(ingested):
    client, run_id = ingested
    before = _events(client, run_id)
    response = post_batch(client, run_id, _batch(_stream(), 400, 450))
    assert response.json()["duplicate"] is True
    assert _comparable(_events(client, run_id)) == _comparable(before)


def test_events_state_survives_restart_and_is_shared_by_workers(settings):
    stream = _stream()
    with TestClient(create_app(settings)) as reference:
        expected_run = create_run(reference)
        _ingest(reference, expected_run, stream)
        expected = _comparable(_events(reference, expected_run))
        expected_health = reference.get(f"/api/v1/runs/{expected_run}/health").json()

    with TestClient(create_app(settings)) as first:
        run_id = create_run(first)
        _ingest(first, run_id, stream, 0, 300)
    # A restarted server and a second worker alternate batches of the same run.
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        for index, first_step in enumerate(range(300, _STEPS, _BATCH)):
            worker = (a, b)[index % 2]
            batch = _batch(stream, first_step, first_step + _BATCH)
            assert post_batch(worker, run_id, batch).status_code == 200
        assert _comparable(_events(a, run_id)) == expected
        health = b.get(f"/api/v1/runs/{run_id}/health").json()
    assert health["detections"] == expected_health["detections"]


def test_health_summarises_run(ingested):
    client, run_id = ingested
    response = client.get(f"/api/v1/runs/{run_id}/health", params={"recent_steps": 1000})
    assert response.status_code == 200
    health = response.json()
    assert health["verdict"] == "critical"
    assert health["status"] == "running"
    assert health["last_step"] == _STEPS - 1
    assert health["detections"]["nonfinite"]["critical"] >= 2  # the layer and the run
    assert health["detections"]["vanishing"] == {"warning": 0, "critical": 0}
    assert health["last_event"]["first_step"] == _NAN_STEP
    worst = {layer["layer"]: layer for layer in health["worst_layers"]}
    assert set(worst) == {"head", "encoder/dense"}
    assert worst["encoder/dense"]["nonfinite_values"] == 7
    assert worst["head"]["max_grad_norm"] > 50

    recent = client.get(f"/api/v1/runs/{run_id}/health", params={"recent_steps": 10}).json()
    assert recent["verdict"] == "healthy"  # nothing in the last 10 steps


def test_health_of_a_run_without_steps_is_no_data(client):
    run_id = create_run(client)
    health = client.get(f"/api/v1/runs/{run_id}/health").json()
    assert health["verdict"] == "no_data"
    assert health["last_event"] is None
    assert health["worst_layers"] == []


def test_detectors_config_defaults_put_and_get(client):
    default = client.get("/api/v1/projects/vision/detectors")
    assert default.status_code == 200
    config = default.json()
    config["thresholds"]["explosion"]["ceiling"] = 10.0
    config["layers"] = [{"pattern": "encoder/*", "explosion": {"ceiling": 1000.0}}]
    response = client.put("/api/v1/projects/vision/detectors", json=config)
    assert response.status_code == 200, response.text
    assert client.get("/api/v1/projects/vision/detectors").json() == response.json()
    assert client.get("/api/v1/projects/other/detectors").json() == default.json()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"thresholds": {"explosion": {"z_threshold": -1}}}, "z_threshold"),
        ({"thresholds": {"vanishing": {"consecutive_steps": 0}}}, "consecutive_steps"),
        ({"thresholds": {"clip_rate": {"max_fraction": 1.5}}}, "max_fraction"),
        ({"thresholds": {"cooldown_steps": -3}}, "cooldown_steps"),
        ({"thresholds": {"explosion": {"unknown_option": 1}}}, "unknown_option"),
        ({"layers": [{"explosion": {"ceiling": 5.0}}]}, "pattern"),
    ],
)
def test_detectors_config_invalid_is_422_naming_the_field(client, change, field):
    response = client.put("/api/v1/projects/vision/detectors", json=change)
    assert response.status_code == 422
    assert field in response.text
    assert client.get("/api/v1/projects/vision/detectors").json()["layers"] == []


def test_detectors_config_changed_mid_run_applies_from_the_next_batch(client):
    """The server keeps validated thresholds between batches: a change (and a change back to
    thresholds it has seen) still applies from the next batch on."""
    run_id = create_run(client, project="vision")
    for step, ceiling in enumerate([10.0, 100.0, 10.0]):
        config = {"thresholds": {"explosion": {"ceiling": ceiling}}}
        assert client.put("/api/v1/projects/vision/detectors", json=config).status_code == 200
        batch = make_batch([step], _LAYERS, grad_norm=[[1.0, 1.0, 50.0]], global_norm=[5.0])
        assert post_batch(client, run_id, batch).status_code == 200
    (event,) = _events(client, run_id, rule="explosion")
    # Steps 0 and 2 (ceiling 10) fired and merged; step 1 (ceiling 100) did not fire.
    assert (event["layer"], event["first_step"], event["last_step"]) == ("head", 0, 2)
    assert event["count"] == 2


def test_detectors_config_ceiling_applies_per_layer_pattern(client):
    config = {
        "thresholds": {"explosion": {"ceiling": 10.0}},
        "layers": [{"pattern": "encoder/*", "explosion": {"ceiling": 1000.0}}],
    }
    assert client.put("/api/v1/projects/vision/detectors", json=config).status_code == 200
    run_id = create_run(client, project="vision")
    # Step 0, no baseline yet: only the ceiling can fire.
    batch = make_batch([0], _LAYERS, grad_norm=[[50.0, 50.0, 50.0]], global_norm=[5.0])
    assert post_batch(client, run_id, batch).status_code == 200
    fired = {e["layer"] for e in _events(client, run_id, rule="explosion")}
    assert fired == {"head"}  # encoder layers allow 1000, head and the run 10 (run: 5 < 10)
