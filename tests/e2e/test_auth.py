"""A server with tokens: the agent streams with its token; without one it is refused, visibly."""

from __future__ import annotations

import subprocess
import sys

import httpx
import keras
import numpy as np
import pytest

from gradwatch.agent import GradientMonitor
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer

pytestmark = pytest.mark.e2e


def _token(database_url: str, *scopes: str) -> str:
    args = [sys.executable, "-m", "gradwatch.server.cli", "token", "create", "--project", "p"]
    for scope in scopes:
        args += ["--scope", scope]
    result = subprocess.run(
        [*args, "--database-url", database_url], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def _fit(monitor: GradientMonitor) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])


def test_agent_streams_with_its_token_and_is_refused_without(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_TOKEN", raising=False)
    database_url = f"sqlite:///{tmp_path / 'auth.db'}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gradwatch.server.cli",
            "db",
            "upgrade",
            "--database-url",
            database_url,
        ],
        check=True,
        capture_output=True,
    )
    ingest = _token(database_url, "ingest")
    read = _token(database_url, "read")
    with EmbeddedServer(Settings(database_url=database_url)) as server:
        with GradientMonitor(
            run="authed", server=server.url, project="p", token=ingest, spool_max_bytes=0
        ) as monitor:
            _fit(monitor)
            assert monitor.flush(timeout_seconds=30)
        assert monitor.dropped_batches == {}

        anonymous = GradientMonitor(
            run="anonymous", server=server.url, project="p", spool_max_bytes=0
        )
        _fit(anonymous)  # completes: a 401 never reaches the training loop
        anonymous.close(timeout_seconds=30)
        assert anonymous.dropped_batches.get("rejected", 0) >= 1

        with httpx.Client(base_url=server.url, timeout=10) as api:
            assert api.get("/api/v1/runs").status_code == 401
            headers = {"Authorization": f"Bearer {read}"}
            runs = api.get("/api/v1/runs", headers=headers).json()["runs"]
            assert [run["name"] for run in runs] == ["authed"]
            assert runs[0]["num_steps"] == 4
