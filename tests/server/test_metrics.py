"""/metrics: stored run state and self-metrics in Prometheus text format, per-app registry."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from gradwatch.server.export.prometheus import RunStateCollector
from gradwatch.server.store.db import Database, create_db_engine
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

    allowed = {"run_id", "project", "name", "status", "reason", "le", "rule", "severity", "layer"}
    for samples in _scrape(client).values():
        for sample in samples:
            assert set(sample.labels) <= allowed, sample
            assert sample.timestamp is None


def test_metrics_counts_ingest_and_rejections(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 2], layers=["a"]))
    bad = make_batch([3], layers=["a"], schema=2)
    post_batch(client, run_id, bad)
    post_batch(client, run_id, make_batch([1, 2], layers=["a"]))  # 1 is not stored, 2 is: 409
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


def test_metrics_detector_counters_start_at_zero_and_count_detections(make_database_url):
    settings = Settings(database_url=make_database_url(), metrics_cache_seconds=0)
    with TestClient(create_app(settings)) as client:
        _check_detector_counters(client)


def _check_detector_counters(client: TestClient) -> None:
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1]))
    before = _scrape(client)["gradwatch_detector_events"]
    combinations = {
        (s.labels["rule"], s.labels["severity"]) for s in before if s.labels["run_id"] == run_id
    }
    assert combinations == {
        (rule, severity)
        for rule in ("explosion", "nonfinite", "vanishing", "clip_rate", "loss")
        for severity in ("warning", "critical")
    }
    assert all(s.value == 0 for s in before)

    post_batch(client, run_id, make_batch([2], nonfinite=[[4, 0]], global_norm=[math.inf]))
    after = _scrape(client)["gradwatch_detector_events"]
    name = "gradwatch_detector_events_total"
    nonfinite = _value(after, name, run_id=run_id, rule="nonfinite", severity="critical")
    assert nonfinite == 2  # layer "dense" and the run


def test_metrics_window_max_keeps_a_spike_after_calm_steps(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1, 2], global_norm=[1.0, 1e6, 2.0]))
    post_batch(client, run_id, make_batch([3, 4], global_norm=[float("nan"), 3.0]))

    families = _scrape(client)
    run = {"run_id": run_id}
    window = families["gradwatch_global_grad_norm_window_max"]
    assert _value(window, "gradwatch_global_grad_norm_window_max", **run) == 1e6
    assert _value(families["gradwatch_global_grad_norm"], "gradwatch_global_grad_norm", **run) == 3
    clipped = families["gradwatch_global_grad_norm_clipped"]
    assert _value(clipped, "gradwatch_global_grad_norm_clipped", **run) == 1.0
    assert _value(families["gradwatch_steps"], "gradwatch_steps_total", **run) == 5


def test_metrics_window_max_forgets_after_two_windows(make_database_url):
    settings = Settings(
        database_url=make_database_url(), norm_window_seconds=1e-6, metrics_cache_seconds=0
    )
    with TestClient(create_app(settings)) as client:
        run_id = create_run(client)
        post_batch(client, run_id, make_batch([0], global_norm=[1e6]))
        post_batch(client, run_id, make_batch([1], global_norm=[2.0]))
        post_batch(client, run_id, make_batch([2], global_norm=[3.0]))
        window = _scrape(client)["gradwatch_global_grad_norm_window_max"]
    assert _value(window, "gradwatch_global_grad_norm_window_max", run_id=run_id) == 3.0


def test_metrics_exports_top_k_layers_and_truncation(make_database_url):
    settings = Settings(database_url=make_database_url(), metrics_top_k_layers=2)
    layers = ["a", "b", "c"]
    with TestClient(create_app(settings)) as client:
        wide = create_run(client, name="wide")
        post_batch(client, wide, make_batch([0], layers, grad_norm=[[3.0, float("nan"), 7.0]]))
        narrow = create_run(client, name="narrow")
        post_batch(client, narrow, make_batch([0], ["a"], grad_norm=[[1.5]]))
        families = _scrape(client)

    norms = {
        (s.labels["run_id"], s.labels["layer"]): s.value
        for s in families["gradwatch_layer_grad_norm"]
    }
    assert set(norms) == {(wide, "b"), (wide, "c"), (narrow, "a")}  # NaN ranks first
    assert math.isnan(norms[(wide, "b")])
    assert norms[(wide, "c")] == 7.0
    truncated = families["gradwatch_layer_series_truncated"]
    assert _value(truncated, "gradwatch_layer_series_truncated", run_id=wide) == 1
    assert _value(truncated, "gradwatch_layer_series_truncated", run_id=narrow) == 0


def test_metrics_finished_runs_leave_after_grace_period(make_database_url):
    url = make_database_url()
    for grace, exported in ((3600.0, True), (0.0, False)):
        settings = Settings(database_url=url, finished_run_grace_seconds=grace)
        with TestClient(create_app(settings)) as client:
            run_id = create_run(client, name=f"grace-{grace}")
            post_batch(client, run_id, make_batch([0]))
            patch = client.patch(f"/api/v1/runs/{run_id}", json={"status": "finished"})
            assert patch.status_code == 200
            families = _scrape(client)
        runs = {s.labels["run_id"]: s.labels for s in families["gradwatch_run_info"]}
        assert (run_id in runs) is exported
        if exported:
            assert runs[run_id]["status"] == "finished"
        steps = {s.labels["run_id"] for s in families["gradwatch_run_step"]}
        assert (run_id in steps) is exported


def test_metrics_collector_caches_for_a_short_time(make_database_url):
    url = make_database_url()
    now = [time.time()]
    settings = Settings(database_url=url, metrics_cache_seconds=5.0)
    with TestClient(create_app(settings)) as client:
        engine = create_db_engine(url)
        try:
            collector = RunStateCollector(Database(engine), settings, clock=lambda: now[0])
            first = collector.collect()
            create_run(client, name="later")
            now[0] += 4.0
            assert collector.collect() is first
            now[0] += 1.0
            fresh = collector.collect()
        finally:
            engine.dispose()
    info = next(f for f in fresh if f.name == "gradwatch_run_info")
    assert [s.labels["name"] for s in info.samples] == ["later"]


def test_metrics_output_passes_promtool_check_metrics(client):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("GRADWATCH_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("promtool not found (GRADWATCH_REQUIRE_PROMETHEUS=1 forbids skipping)")
        pytest.skip("promtool not found; install it with: apt-get install prometheus")
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1], nonfinite=[[0, 0], [1, 0]]))
    text = client.get("/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
