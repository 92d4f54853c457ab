"""Backups: ``gradwatch db backup`` while a thread ingests, restored and served, on both
backends (SQLite: the copied file; PostgreSQL: ``pg_restore`` into a new database)."""

from __future__ import annotations

import math
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gradwatch.server.app import create_app
from gradwatch.server.cli import app as cli_app
from gradwatch.server.config import Settings
from gradwatch.server.store.backup import BackupError, backup_database
from tests.server.postgres import find_postgres_bin
from tests.server.wire import create_run, make_batch, post_batch

runner = CliRunner()

_RUN_METRICS = ("loss", "global_norm", "global_norm_clipped", "clip_coef", "skipped")
_LAYER_METRICS = ("grad_norm", "nonfinite")
_LAYERS = ("dense", "dense_1", "out")
_PAGE = 10_000


def _series(client: TestClient, run_id: str, metric: str, layer: str | None) -> dict[str, list]:
    """Every stored value of one series, raw, page by page."""
    steps: list[int] = []
    values: list[Any] = []
    params: dict[str, Any] = {"metric": metric, "raw": True, "max_points": _PAGE}
    if layer is not None:
        params["layer"] = layer
    for _ in range(1000):  # bounded: far more pages than any run here has
        response = client.get(f"/api/v1/runs/{run_id}/series", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        steps += body["step"]
        values += body["value"]
        if body["next_start"] is None:
            return {"step": steps, "value": values}
        params["start"] = body["next_start"]
    raise AssertionError("series did not end")


def _read_run(client: TestClient, run_id: str) -> dict[str, Any]:
    """The run's overview and every stored step of every series, as the REST API returns it."""
    stored: dict[str, Any] = {"run": client.get(f"/api/v1/runs/{run_id}").json()}
    for metric in _RUN_METRICS:
        stored[metric] = _series(client, run_id, metric, None)
    for metric in _LAYER_METRICS:
        for layer in _LAYERS:
            stored[f"{metric}/{layer}"] = _series(client, run_id, metric, layer)
    stored["events"] = client.get(f"/api/v1/runs/{run_id}/events").json()
    return stored


def _post(client: TestClient, run_id: str, first: int, count: int = 25) -> None:
    steps = list(range(first, first + count))
    grad = [[0.1 * s, float(s % 7), 1.0 / (1 + s)] for s in steps]
    grad[3][1] = math.nan  # non-finite values must survive the round trip
    grad[4][2] = math.inf
    nonfinite = [[0, 0, 0] for _ in steps]
    nonfinite[3][1] = 1
    body = make_batch(steps, _LAYERS, grad_norm=grad, nonfinite=nonfinite)
    response = post_batch(client, run_id, body)
    assert response.status_code == 200, response.text


def _restore(backend: str, backup: Path, request: pytest.FixtureRequest) -> str:
    """A database restored from ``backup``; its URL."""
    if backend == "sqlite":
        return f"sqlite:///{backup}"
    server = request.getfixturevalue("postgres")
    url = server.cluster.create_database()  # empty: pg_restore creates the schema
    bin_dir = find_postgres_bin()
    assert bin_dir is not None
    name = url.rsplit("/", 1)[1]
    request.addfinalizer(lambda: server.cluster.drop_database(name))
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    subprocess.run(
        [
            str(bin_dir / "pg_restore"),
            "--no-owner",
            "--exit-on-error",
            f"--dbname={conninfo}",
            str(backup),
        ],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return url


def test_backup_taken_during_ingest_restores_every_stored_step(
    client, database_url, backend, tmp_path, request
):
    finished = [create_run(client, name=f"done-{i}") for i in range(2)]
    for run_id in finished:
        for first in range(0, 200, 25):
            _post(client, run_id, first)
    live = create_run(client, name="live")
    batches = 16
    started = threading.Event()

    def ingest() -> None:
        for index in range(batches):
            _post(client, live, index * 25)
            if index == 1:
                started.set()  # the backup starts once the live run has data

    thread = threading.Thread(target=ingest)
    thread.start()
    try:
        assert started.wait(120)
        backup = tmp_path / ("backup.db" if backend == "sqlite" else "backup.dump")
        result = runner.invoke(
            cli_app, ["db", "backup", str(backup), "--database-url", database_url]
        )
    finally:
        thread.join()
    assert result.exit_code == 0, result.output
    assert f"backed up to {backup}" in result.output

    restored_url = _restore(backend, backup, request)
    with TestClient(create_app(Settings(database_url=restored_url))) as restored:
        for run_id in finished:
            assert _read_run(restored, run_id) == _read_run(client, run_id)
        # The live run was caught mid-ingest: whole batches only, each identical to the source.
        copy, source = _read_run(restored, live), _read_run(client, live)
        stored_steps = copy["global_norm"]["step"]
        assert len(stored_steps) % 25 == 0
        assert len(stored_steps) >= 2 * 25
        assert copy["run"]["num_steps"] == len(stored_steps)
        for key, series in copy.items():
            if key in ("run", "events"):
                continue
            count = len(series["step"])
            assert count == len(stored_steps)
            assert series["step"] == source[key]["step"][:count]
            assert series["value"] == source[key]["value"][:count]
        assert source["run"]["num_steps"] == batches * 25


def test_backup_refuses_an_existing_destination(database_url, tmp_path):
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me")

    result = runner.invoke(cli_app, ["db", "backup", str(existing), "--database-url", database_url])

    assert result.exit_code == 2
    assert result.output.strip() == (
        f"gradwatch db backup: {existing} exists; remove it or pass --force to replace it"
    )
    assert existing.read_bytes() == b"keep me"
    forced = runner.invoke(
        cli_app, ["db", "backup", str(existing), "--force", "--database-url", database_url]
    )
    assert forced.exit_code == 0, forced.output
    assert existing.read_bytes() != b"keep me"


def test_backup_sqlite_missing_source_creates_nothing(tmp_path):
    result = runner.invoke(
        cli_app,
        ["db", "backup", str(tmp_path / "b.db"), "--database-url", f"sqlite:///{tmp_path}/no.db"],
    )
    assert result.exit_code == 2
    assert result.output.strip() == f"gradwatch db backup: no SQLite database at {tmp_path}/no.db"
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_backup_postgres_without_pg_dump_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("gradwatch.server.store.backup.find_pg_dump", lambda: None)
    with pytest.raises(BackupError, match="install the PostgreSQL client tools"):
        backup_database("postgresql+psycopg://gw@127.0.0.1:1/gw", tmp_path / "b.dump")
    assert list(tmp_path.iterdir()) == []


def test_backup_postgres_unreachable_is_one_line_exit_2(tmp_path):
    result = runner.invoke(
        cli_app,
        [
            "db",
            "backup",
            str(tmp_path / "b.dump"),
            "--database-url",
            "postgresql+psycopg://gw@127.0.0.1:1/gw",
        ],
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("gradwatch db backup: ")
    assert list(tmp_path.iterdir()) == []
