"""Retention: ``prune_runs``, the background prune and ``gradwatch db prune``, on both backends."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import ForeignKey, text, update
from typer.testing import CliRunner

from gradwatch.server.app import create_app
from gradwatch.server.cli import app as cli_app
from gradwatch.server.cli.maintenance import parse_duration
from gradwatch.server.config import Settings
from gradwatch.server.store.db import Database, create_db_engine
from gradwatch.server.store.models import Base, Run
from gradwatch.server.store.retention import TABLES, prune_runs
from tests.server.wire import create_run, get_series, make_batch, post_batch

runner = CliRunner()
NOW = datetime.now(UTC)
CUTOFF = NOW - timedelta(days=90)

_COUNTS = {
    "blocks": "SELECT count(*) FROM blocks JOIN series ON series.id = blocks.series_id "
    "WHERE series.run_id = :run",
    **{
        table: f"SELECT count(*) FROM {table} WHERE run_id = :run"
        for table in TABLES
        if table not in ("blocks", "runs")
    },
    "runs": "SELECT count(*) FROM runs WHERE id = :run",
}


@pytest.fixture
def database(database_url):
    engine = create_db_engine(database_url)
    yield Database(engine)
    engine.dispose()


def _rows(database: Database, run_id: str) -> dict[str, int]:
    """Rows of a run in every table that holds any, counted by plain SQL."""
    with database.engine.connect() as connection:
        return {
            table: int(connection.execute(text(sql), {"run": run_id}).scalar_one())
            for table, sql in _COUNTS.items()
        }


def _seed(client: TestClient, name: str, batches: int = 4, *, status: str | None) -> str:
    """A run with blocks, rollups, events (a non-finite step), drops, detector state and an
    announced incident bundle per batch."""
    run_id = create_run(client, name=name)
    for index in range(batches):
        steps = list(range(index * 10, index * 10 + 10))
        nonfinite = [[0, 0] for _ in steps]
        nonfinite[3] = [0, 2]
        incident = {
            "step": steps[3],
            "cause": "nonfinite",
            "path": f"/incidents/step-{steps[3]}",
            "host": "trainer",
            "bytes": 10,
            "format": "gradwatch-incident/1",
        }
        body = make_batch(
            steps,
            nonfinite=nonfinite,
            dropped_batches={"queue_full": index},
            incidents=[incident],
        )
        assert post_batch(client, run_id, body).status_code == 200
    if status is not None:
        response = client.patch(f"/api/v1/runs/{run_id}", json={"status": status})
        assert response.status_code == 200, response.text
    return run_id


def _age(database: Database, run_id: str, days: float) -> None:
    """Make a run's last activity ``days`` old."""
    with database.engine.begin() as connection:
        connection.execute(
            update(Run).where(Run.id == run_id).values(updated_at=NOW - timedelta(days=days))
        )


def _snapshot(client: TestClient, run_id: str) -> object:
    run = client.get(f"/api/v1/runs/{run_id}").json()
    return run, get_series(client, run_id, "grad_norm", layer="dense_1", raw=True)


def test_retention_covers_every_table_that_references_a_run():
    reaches_run = {"runs"}
    for _ in range(len(Base.metadata.tables)):  # fixpoint over the foreign keys, bounded
        for table in Base.metadata.sorted_tables:
            keys: set[ForeignKey] = set(table.foreign_keys)
            if any(key.column.table.name in reaches_run for key in keys):
                reaches_run.add(table.name)
    assert reaches_run == set(TABLES)


def test_retention_prune_deletes_old_finished_runs_and_every_dependent_row(client, database):
    old_finished = _seed(client, "old-finished", status="finished")
    old_failed = _seed(client, "old-failed", status="failed")
    old_running = _seed(client, "old-running", status=None)
    recent_finished = _seed(client, "recent-finished", status="finished")
    for run_id in (old_finished, old_failed, old_running):
        _age(database, run_id, days=400)
    _age(database, recent_finished, days=30)
    before = {run_id: _rows(database, run_id) for run_id in (old_finished, old_failed)}
    for counts in before.values():
        assert all(counts[table] > 0 for table in TABLES), counts  # every table exercised
    kept = {run_id: _snapshot(client, run_id) for run_id in (old_running, recent_finished)}

    report = prune_runs(database, CUTOFF, chunk_rows=3)  # many small transactions

    assert report is not None
    assert not report.stopped
    assert set(report.run_ids) == {old_finished, old_failed}
    for table in TABLES:
        assert report.rows[table] == sum(counts[table] for counts in before.values()), table
    assert report.sample_bytes > 0
    for run_id in (old_finished, old_failed):
        assert set(_rows(database, run_id).values()) == {0}
        assert client.get(f"/api/v1/runs/{run_id}").status_code == 404
    for run_id, snapshot in kept.items():
        assert _snapshot(client, run_id) == snapshot
    listed = {run["run_id"] for run in client.get("/api/v1/runs").json()["runs"]}
    assert listed == {old_running, recent_finished}
    again = prune_runs(database, CUTOFF)
    assert again is not None
    assert again.run_ids == ()
    assert set(again.rows.values()) == {0}


def test_retention_dry_run_changes_nothing_and_predicts_the_prune(client, database):
    old = _seed(client, "old", status="finished")
    _age(database, old, days=100)
    before = _rows(database, old)

    dry = prune_runs(database, CUTOFF, dry_run=True)

    assert dry is not None
    assert dry.dry_run
    assert dry.run_ids == (old,)
    assert _rows(database, old) == before
    real = prune_runs(database, CUTOFF)
    assert real is not None
    assert (real.run_ids, real.rows, real.sample_bytes) == (
        dry.run_ids,
        dry.rows,
        dry.sample_bytes,
    )


def test_retention_prune_loses_nothing_of_a_run_ingesting_meanwhile(client, database):
    old = [_seed(client, f"old-{i}", batches=6, status="finished") for i in range(2)]
    for run_id in old:
        _age(database, run_id, days=365)
    live = create_run(client, name="live")
    batches = 30
    progress = threading.Condition()
    posted = [0]
    failures: list[str] = []

    def ingest() -> None:
        for index in range(batches):
            steps = list(range(index * 5, index * 5 + 5))
            response = post_batch(client, live, make_batch(steps))
            if response.status_code != 200:
                failures.append(response.text)
            with progress:
                posted[0] += 1
                progress.notify_all()

    seen = [0]

    def between_chunks() -> bool:
        # Lock-step: after each chunk let the ingest thread store one more batch, so prune
        # transactions and ingest transactions interleave on every backend.
        with progress:
            progress.wait_for(lambda: posted[0] > seen[0] or posted[0] == batches, timeout=60)
            seen[0] = posted[0]
        return False

    thread = threading.Thread(target=ingest)
    thread.start()
    try:
        report = prune_runs(database, CUTOFF, chunk_rows=2, should_stop=between_chunks)
    finally:
        thread.join()

    assert failures == []
    assert report is not None
    assert set(report.run_ids) == set(old)
    assert seen[0] > 1  # the prune really ran while batches were arriving
    steps = list(range(batches * 5))
    assert get_series(client, live, "global_norm", raw=True, max_points=1000)["step"] == steps
    grad = get_series(client, live, "grad_norm", layer="dense", raw=True, max_points=1000)
    assert grad["step"] == steps
    assert client.get(f"/api/v1/runs/{live}").json()["num_steps"] == len(steps)
    for run_id in old:
        assert set(_rows(database, run_id).values()) == {0}


def test_retention_server_prunes_in_the_background(client, database, database_url):
    old = _seed(client, "old", status="failed")
    recent = _seed(client, "recent", status="finished")
    _age(database, old, days=91)
    _age(database, recent, days=89)
    settings = Settings(database_url=database_url, retention_days=90)

    with TestClient(create_app(settings)) as pruning:
        retainer = pruning.app.state.retainer
        assert retainer.wait_for_pass(1, timeout_seconds=120)
        assert pruning.get(f"/api/v1/runs/{old}").status_code == 404
        assert pruning.get(f"/api/v1/runs/{recent}").status_code == 200
        assert retainer.last_report.run_ids == (old,)
    assert client.app.state.retainer is None  # off by default


def test_retention_settings_reject_a_non_positive_retention(database_url):
    with pytest.raises(ValueError, match="retention_days"):
        Settings(database_url=database_url, retention_days=0)


@pytest.mark.parametrize(
    ("text_", "seconds"),
    [("90d", 90 * 86_400), ("12h", 43_200), ("30m", 1800), ("45s", 45), ("2w", 1_209_600)],
)
def test_retention_parse_duration(text_, seconds):
    assert parse_duration(text_).total_seconds() == seconds


def test_cli_db_prune_deletes_and_reports(client, database, database_url):
    old = _seed(client, "old", status="finished")
    recent = _seed(client, "recent", status="finished")
    _age(database, old, days=100)

    dry = runner.invoke(
        cli_app, ["db", "prune", "--older-than", "90d", "--dry-run", "--database-url", database_url]
    )
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would delete 1 finished or failed runs")
    assert _rows(database, old)["runs"] == 1

    result = runner.invoke(
        cli_app, ["db", "prune", "--older-than", "90d", "--json", "--database-url", database_url]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["runs"] == [old]
    assert not report["dry_run"]
    assert report["rows"]["runs"] == 1
    assert report["rows"]["blocks"] > 0
    assert (report["sqlite_bytes"] is None) == (database.engine.dialect.name != "sqlite")
    assert set(_rows(database, old).values()) == {0}
    assert _rows(database, recent)["runs"] == 1


def test_cli_db_prune_vacuum(client, database, database_url, backend):
    old = _seed(client, "old", batches=20, status="finished")
    _age(database, old, days=100)
    args = ["db", "prune", "--older-than", "90d", "--vacuum", "--database-url", database_url]

    result = runner.invoke(cli_app, args)

    if backend == "sqlite":
        assert result.exit_code == 0, result.output
        assert "before VACUUM" in result.output
        assert _rows(database, old)["runs"] == 0
    else:
        assert result.exit_code == 2
        assert "gradwatch db prune: --vacuum is for SQLite" in result.output
        assert _rows(database, old)["runs"] == 1  # refused before deleting anything


@pytest.mark.parametrize("duration", ["90", "90x", "-5d", "0d", "d", "1.5.2h", ""])
def test_cli_db_prune_rejects_bad_durations(duration, tmp_path):
    result = runner.invoke(
        cli_app,
        ["db", "prune", "--older-than", duration, "--database-url", f"sqlite:///{tmp_path}/x.db"],
    )
    assert result.exit_code == 2
    assert "--older-than" in result.output
    assert "is not a positive duration" in result.output
    assert not (tmp_path / "x.db").exists()


def test_cli_db_prune_refuses_vacuum_with_dry_run(tmp_path):
    result = runner.invoke(
        cli_app,
        ["db", "prune", "--older-than", "1d", "--dry-run", "--vacuum"],
    )
    assert result.exit_code == 2
    assert "--vacuum" in result.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///{tmp}/missing.db", "no SQLite database at"),
        ("postgresql+psycopg://gw@127.0.0.1:1/gw", "cannot open the database"),
        ("nosuchdriver://x", "bad database URL"),
    ],
)
def test_cli_db_prune_unusable_database_is_one_line_exit_2(url, message, tmp_path):
    if url.startswith("postgresql"):
        pytest.importorskip("psycopg")
    result = runner.invoke(
        cli_app, ["db", "prune", "--older-than", "1d", "--database-url", url.format(tmp=tmp_path)]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("gradwatch db prune: ")
    assert message in lines[0]
    assert not (tmp_path / "missing.db").exists()
