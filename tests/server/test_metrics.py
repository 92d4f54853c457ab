"""/metrics: stored run state and self-metrics in Prometheus text format, per-app registry."""

from __future__ import annotations

import math

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from tests.server.wire import create_run, make_batch, post_batch


def _scrape(client: TestClient) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def _value(samples, sample_name, **labels):
    matches = [s.value for s in samples if s.name == sample_name and s.labels == labels]
    assert len(matches) == 1, (sample_name, labels, samples)
    return matches[0]


def test_metrics_exports_run_state(client):
    run_id = create_run(client, name="resnet", project="vision")
    post_batch(
        client,
        run_id,
        make_batch(
            [0, 1, 2],
            global_norm=[1.0, 50.0, 2.5],
            clip_coef=[1.0, 0.02, 0.4],
            skipped=[False, True, False],
            nonfinite=[[0, 0], [3, 1], [0, 0]],
            dropped_batches={"queue_full": 2},
        ),
    )
    post_batch(client, run_id, make_batch([3], global_norm=[4.25]))

    families = _scrape(client)
    run = {"run_id": run_id}

    info = families["gradwatch_run_info"]
    assert (
        _value(info, "gradwatch_run_info", **run, project="vision", name="resnet", status="running")
        == 1
    )
    assert _value(families["gradwatch_run_step"], "gradwatch_run_step", **run) == 3
    assert (
        _value(families["gradwatch_global_grad_norm"], "gradwatch_global_grad_norm", **run) == 4.25
    )
    assert _value(families["gradwatch_loss"], "gradwatch_loss", **run) == 1.0 / 4
    assert _value(families["gradwatch_clipped_steps"], "gradwatch_clipped_steps_total", **run) == 2
    assert _value(families["gradwatch_skipped_steps"], "gradwatch_skipped_steps_total", **run) == 1
    nonfinite = families["gradwatch_nonfinite_grad_values"]
    assert _value(nonfinite, "gradwatch_nonfinite_grad_values_total", **run) == 4
    dropped = families["gradwatch_agent_dropped_batches"]
    assert _value(dropped, "gradwatch_agent_dropped_batches_total", **run, reason="queue_full") == 2
    last_ingest = families["gradwatch_run_last_ingest_timestamp_seconds"]
    assert _value(last_ingest, "gradwatch_run_last_ingest_timestamp_seconds", **run) > 1.7e9


def test_metrics_exports_nan_global_norm(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0], global_norm=[float("nan")]))

    families = _scrape(client)

    value = _value(
        families["gradwatch_global_grad_norm"], "gradwatch_global_grad_norm", run_id=run_id
    )
    assert math.isnan(value)


def test_metrics_labels_never_carry_steps(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1]))

    allowed = {"run_id", "project", "name", "status", "reason", "le"}
    for samples in _scrape(client).values():
        for sample in samples:
            assert set(sample.labels) <= allowed, sample
            assert sample.timestamp is None


def test_metrics_counts_ingest_and_rejections(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1], layers=["a"]))
    bad = make_batch([2], layers=["a"], schema=2)
    post_batch(client, run_id, bad)
    post_batch(client, run_id, make_batch([1, 2], layers=["a"]))
    client.post(
        f"/api/v1/runs/{run_id}/batches",
        content=b"junk",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )

    families = _scrape(client)

    samples_stored = 2 * (5 + 2)
    assert (
        _value(families["gradwatch_ingest_samples"], "gradwatch_ingest_samples_total")
        == samples_stored
    )
    rejected = families["gradwatch_ingest_rejected"]
    assert _value(rejected, "gradwatch_ingest_rejected_total", reason="invalid") == 1
    assert _value(rejected, "gradwatch_ingest_rejected_total", reason="batch_conflict") == 1
    assert _value(rejected, "gradwatch_ingest_rejected_total", reason="malformed_body") == 1
    assert _value(rejected, "gradwatch_ingest_rejected_total", reason="run_not_found") == 0
    duration = families["gradwatch_ingest_request_duration_seconds"]
    assert _value(duration, "gradwatch_ingest_request_duration_seconds_count") == 4


def test_metrics_registries_are_per_app(make_database_url):
    first = create_app(Settings(database_url=make_database_url()))
    second = create_app(Settings(database_url=make_database_url()))

    with TestClient(first) as a, TestClient(second) as b:
        run_id = create_run(a)
        post_batch(a, run_id, make_batch([0]))

        run_info_a = _scrape(a)["gradwatch_run_info"]
        run_info_b = _scrape(b)["gradwatch_run_info"]

    assert len(run_info_a) == 1
    assert run_info_b == []
