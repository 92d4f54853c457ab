"""/metrics' own exposition: the same bytes as prometheus_client, per-run reuse between
scrapes, and every change to a run in the next uncached scrape."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from sqlalchemy import update

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from gradwatch.server.export import family
from gradwatch.server.export.prometheus import RunStateCollector, ServerMetrics
from gradwatch.server.store import scrape as scrape_store
from gradwatch.server.store.db import Database, create_db_engine, upgrade_database
from gradwatch.server.store.models import Run
from tests.server.wire import create_run, make_batch, post_batch

ACCEPT_HEADERS = [
    "",
    "text/plain;version=0.0.4",
    # What Prometheus 2.x/3.x sends: OpenMetrics first.
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=values",
    "text/plain;version=1.0.0;escaping=dots",  # rewrites names: prometheus_client's own path
]


def _uncached(url: str, **extra) -> Settings:
    return Settings(database_url=url, metrics_cache_seconds=0, **extra)


def _populate(client: TestClient) -> list[str]:
    """Runs whose labels need escaping, with NaN, ±Inf, large values, drops and detections."""
    odd = create_run(client, name='quote " back \\ slash\nnewline ünïcode ✓', project="vision.v2")
    post_batch(
        client,
        odd,
        make_batch(
            [0, 1, 2],
            ["a\\b", 'c"d', "plain"],
            grad_norm=[[1.0, 2.0, 3.0], [1.5, 2.5, 3.5], [float("nan"), math.inf, 1234567.0]],
            global_norm=[1.0, 2.0, math.inf],
            nonfinite=[[0, 0, 0], [0, 0, 0], [1, 2, 0]],
            dropped_batches={"queue_full": 3, "too_large": 1},
        ),
    )
    plain = create_run(client, name="plain")
    post_batch(client, plain, make_batch([10, 11], global_norm=[2.5e7, float("nan")]))
    create_run(client, name="no batch yet")
    return [odd, plain]


@pytest.mark.parametrize("accept", ACCEPT_HEADERS)
def test_metrics_expose_matches_prometheus_client_encoder(database_url, accept):
    with TestClient(create_app(_uncached(database_url, metrics_top_k_layers=2))) as client:
        odd, plain = _populate(client)
        metrics: ServerMetrics = client.app.state.metrics
        body, content_type = metrics.expose(accept)
        encode, expected_type = choose_encoder(accept)
        expected = encode(metrics.registry)
        response = client.get("/metrics", headers={"Accept": accept})
        # Changed runs are formatted again from their earlier lines' prefixes.
        post_batch(
            client,
            odd,
            make_batch(
                [3],
                ["a\\b", 'c"d', "plain"],
                grad_norm=[[5.0, float("nan"), 0.5]],
                dropped_batches={"queue_full": 4},
            ),
        )
        client.patch(f"/api/v1/runs/{plain}", json={"status": "failed"})
        changed, _ = metrics.expose(accept)
        expected_changed = encode(metrics.registry)

    assert content_type == expected_type
    assert body == expected
    assert response.content == expected
    assert changed == expected_changed
    assert changed != body
    assert odd.encode() in body
    assert plain.encode() in body


def test_metrics_expose_parses_with_every_run(client):
    odd, plain = _populate(client)

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    info = {s.labels["run_id"]: s.labels for s in families["gradwatch_run_info"].samples}
    assert info[odd]["name"] == 'quote " back \\ slash\nnewline ünïcode ✓'
    assert info[odd]["project"] == "vision.v2"
    assert len(info) == 3
    norms = {s.labels["run_id"]: s.value for s in families["gradwatch_global_grad_norm"].samples}
    assert norms[odd] == math.inf
    assert math.isnan(norms[plain])


def _text(collector: RunStateCollector) -> dict[str, list]:
    text = collector.exposition(False).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _one(samples, **labels) -> float:
    matches = [s.value for s in samples if labels.items() <= s.labels.items()]
    assert len(matches) == 1, (labels, samples)
    return matches[0]


def _collector(url: str, settings: Settings):
    engine = create_db_engine(url)
    return engine, RunStateCollector(Database(engine), settings)


def test_metrics_collector_reuses_unchanged_runs_and_reformats_changed_ones(make_database_url):
    url = make_database_url()
    settings = _uncached(url)
    with TestClient(create_app(settings)) as client:
        quiet = create_run(client, name="quiet")
        post_batch(client, quiet, make_batch([0]))
        busy = create_run(client, name="busy")
        post_batch(client, busy, make_batch([0]))
        engine, collector = _collector(url, settings)
        try:
            collector.exposition(False)
            before = dict(collector._runs)
            post_batch(client, busy, make_batch([1]))
            families = _text(collector)
            after = dict(collector._runs)
        finally:
            engine.dispose()

    assert after[quiet] is before[quiet]  # same row: its formatted lines are reused
    assert after[busy] is not before[busy]
    assert _one(families["gradwatch_run_step"], run_id=busy) == 1
    assert _one(families["gradwatch_run_step"], run_id=quiet) == 0


def test_metrics_uncached_scrape_shows_every_change_to_a_run(make_database_url):
    url = make_database_url()
    settings = _uncached(url, finished_run_grace_seconds=3600.0)
    with TestClient(create_app(settings)) as client:
        run_id = create_run(client, name="changing")
        post_batch(client, run_id, make_batch([0, 1], global_norm=[1.0, 2.0]))
        engine, collector = _collector(url, settings)
        try:
            first = _text(collector)
            # A new batch: step, norms, counters and the top layers move.
            post_batch(
                client,
                run_id,
                make_batch([2], grad_norm=[[9.0, 0.25]], global_norm=[3.0], clip_coef=[0.5]),
            )
            second = _text(collector)
            # A detection (non-finite gradients) and new agent drop counts.
            post_batch(
                client,
                run_id,
                make_batch(
                    [3],
                    nonfinite=[[2, 0]],
                    global_norm=[math.inf],
                    dropped_batches={"queue_full": 4},
                ),
            )
            third = _text(collector)
            # A status change.
            patch = client.patch(f"/api/v1/runs/{run_id}", json={"status": "finished"})
            assert patch.status_code == 200
            fourth = _text(collector)
        finally:
            engine.dispose()

    run = {"run_id": run_id}
    assert _one(first["gradwatch_run_step"], **run) == 1
    assert _one(second["gradwatch_run_step"], **run) == 2
    assert _one(second["gradwatch_global_grad_norm"], **run) == 3.0
    assert _one(second["gradwatch_clipped_steps"], **run) == 1
    assert _one(second["gradwatch_layer_grad_norm"], **run, layer="dense") == 9.0
    detection = {"rule": "nonfinite", "severity": "critical"}
    assert _one(second["gradwatch_detector_events"], **run, **detection) == 0
    assert _one(third["gradwatch_detector_events"], **run, **detection) > 0
    assert _one(third["gradwatch_nonfinite_grad_values"], **run) == 2
    assert _one(third["gradwatch_agent_dropped_batches"], **run, reason="queue_full") == 4
    assert _one(third["gradwatch_run_info"], **run)
    assert [s.labels["status"] for s in third["gradwatch_run_info"]] == ["running"]
    assert [s.labels["status"] for s in fourth["gradwatch_run_info"]] == ["finished"]


def test_metrics_workers_answer_the_same_whichever_scraped_before(make_database_url):
    url = make_database_url()
    settings = _uncached(url)
    with TestClient(create_app(settings)) as client:
        run_id = create_run(client)
        post_batch(client, run_id, make_batch([0]))
        engine, early = _collector(url, settings)
        try:
            early.exposition(True)  # this "worker" holds the run's old lines
            post_batch(client, run_id, make_batch([1], global_norm=[7.0]))
            late = RunStateCollector(Database(engine), settings)  # a fresh one
            assert early.exposition(True) == late.exposition(True)
            assert early.exposition(False) == late.exposition(False)
        finally:
            engine.dispose()


def test_metrics_collector_forgets_runs_no_longer_exported(make_database_url):
    url = make_database_url()
    settings = _uncached(url, finished_run_grace_seconds=0.0)
    with TestClient(create_app(settings)) as client:
        run_id = create_run(client)
        post_batch(client, run_id, make_batch([0]))
        engine, collector = _collector(url, settings)
        try:
            collector.exposition(False)
            assert set(collector._runs) == {run_id}
            client.patch(f"/api/v1/runs/{run_id}", json={"status": "failed"})
            assert run_id.encode() not in collector.exposition(False)
            assert collector._runs == {}
        finally:
            engine.dispose()


def test_metrics_scrape_queries_read_only_recently_active_runs(tmp_path):
    """Every scrape query starts from a range of ``ix_runs_updated_at``, never a scan of all
    runs ever stored (SQLite's plan; PostgreSQL's planner picks the index once it pays)."""
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    upgrade_database(url)
    engine = create_db_engine(url)
    now = datetime.now(UTC)
    window = scrape_store._window(now - timedelta(seconds=600), now - timedelta(days=1))
    statements = (
        scrape_store._runs_statement(),
        scrape_store._drops_statement(),
        scrape_store._detections_statement(),
    )
    try:
        with engine.connect() as connection:
            for statement in statements:
                compiled = statement.compile(engine)
                params = compiled.construct_params(window)
                values = tuple(
                    params[name].isoformat(" ")
                    if isinstance(params[name], datetime)
                    else params[name]
                    for name in compiled.positiontup
                )
                plan = [
                    row[3]
                    for row in connection.exec_driver_sql(
                        f"EXPLAIN QUERY PLAN {compiled.string}", values
                    )
                ]
                assert any("runs USING INDEX ix_runs_updated_at" in step for step in plan), plan
                assert not any(step.startswith("SCAN") for step in plan), plan
    finally:
        engine.dispose()


def _sqlite_value(value):
    return value.isoformat(" ") if isinstance(value, datetime) else value


def test_metrics_scrape_window_keeps_old_runs_that_are_active(make_database_url):
    """A run created long ago is exported while it ingests; one that went quiet is not."""
    url = make_database_url()
    settings = _uncached(url, inactive_run_seconds=3600.0, finished_run_grace_seconds=60.0)
    with TestClient(create_app(settings)) as client:
        active = create_run(client, name="active")
        quiet = create_run(client, name="quiet")
        engine = create_db_engine(url)
        try:
            long_ago = datetime.now(UTC) - timedelta(days=30)
            with engine.begin() as connection:
                connection.execute(update(Run).values(created_at=long_ago, updated_at=long_ago))
            post_batch(client, active, make_batch([0]))
            collector = RunStateCollector(Database(engine), settings)
            families = _text(collector)
        finally:
            engine.dispose()

    names = {s.labels["name"] for s in families["gradwatch_run_info"]}
    assert names == {"active"}
    assert quiet not in {s.labels["run_id"] for s in families["gradwatch_run_info"]}


@given(st.one_of(st.floats(), st.integers(min_value=-(2**63), max_value=2**63 - 1)))
def test_metrics_value_format_is_prometheus_clients(value):
    assert family._go_float(value) == floatToGoString(value)
