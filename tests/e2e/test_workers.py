"""``gradwatch server --workers 2``: two processes that serve, count and limit as one server.

The real console script on 127.0.0.1 and a SQLite file. Each keep-alive connection is served
by the worker that accepted it; the test finds which (Linux ``/proc``: the server side of the
connection is a socket one worker holds) and keeps one connection to each worker, so it can
send requests to a chosen worker. Before, the rate limit was per process (two workers allowed
twice the configured rate) and each worker's ``/metrics`` showed its own counters.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.auth import TokenScope, create_token
from gradwatch.server.store.db import Database, create_db_engine, upgrade_database
from tests.server.wire import make_batch
from tests.server_process import ServerProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]

_BURST = 6
_FAILURE_BURST = 2
_MAX_CONNECTIONS = 200  # bound on the connections opened to reach both workers
_REACH_SECONDS = 60.0  # and on the time: a loaded machine may start the second one late


def _console_script():
    sibling = Path(sys.executable).with_name("gradwatch")
    found = str(sibling) if sibling.exists() else shutil.which("gradwatch")
    if found is None:
        pytest.fail("the gradwatch console script is not installed: pip install -e '.[all,dev]'")
    return [found]


def _children(pid):
    """Worker processes of the server (uvicorn spawns them with multiprocessing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _serving_pid(server_port, client_port, workers):
    """The worker holding the server side of the connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            inode = fields[9]
    assert inode is not None, "the connection's server side is not in /proc/net/tcp"
    for pid in workers:
        for fd in (Path("/proc") / str(pid) / "fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class _Connection:
    """One keep-alive HTTP/1.1 connection (so one worker) with JSON helpers."""

    def __init__(self, port):
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.http.connect()
        self.local_port = self.http.sock.getsockname()[1]

    def request(self, method, path, body=None, token=None):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.http.request(method, path, body=content, headers=headers)
        response = self.http.getresponse()
        return response.status, response.read().decode()


def _metric(text, name, labels=None):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    return None


@pytest.fixture
def token(tmp_path):
    url = f"sqlite:///{tmp_path / 'gradwatch.db'}"
    upgrade_database(url)
    engine = create_db_engine(url)
    try:
        with Database(engine).write_session() as session:
            scopes = (TokenScope.INGEST, TokenScope.READ)
            return create_token(session, "default", scopes, "e2e", datetime.now(UTC)).token
    finally:
        engine.dispose()


@pytest.fixture
def two_workers(tmp_path, token):
    server = ServerProcess(
        tmp_path / "gradwatch.db",
        command=_console_script(),
        args=["--workers", "2", "--rate-limit", "0.001"],
        env={
            "GRADWATCH_RATE_LIMIT_BURST": str(_BURST),
            "GRADWATCH_AUTH_FAILURE_RATE_PER_SECOND": "0.001",
            "GRADWATCH_AUTH_FAILURE_BURST": str(_FAILURE_BURST),
            "GRADWATCH_METRICS_CACHE_SECONDS": "0",
        },
    )
    server.start()
    connections = []
    try:
        assert server.process is not None
        workers = _children(server.process.pid)
        assert len(workers) == 2, workers
        by_worker = {}
        deadline = time.monotonic() + _REACH_SECONDS
        for _ in range(_MAX_CONNECTIONS):
            if time.monotonic() > deadline:
                break
            if connections:  # give a worker still starting up the time to accept
                time.sleep(0.1)
            connection = _Connection(server.port)
            connections.append(connection)
            assert connection.request("GET", "/healthz")[0] == 200
            pid = _serving_pid(server.port, connection.local_port, workers)
            by_worker.setdefault(pid, connection)
            if len(by_worker.keys() & set(workers)) == 2:
                break
        assert set(by_worker) >= set(workers), "one worker accepted every connection"
        yield by_worker[workers[0]], by_worker[workers[1]]
    finally:
        for connection in connections:
            connection.http.close()
        server.stop()


def test_workers_share_ingest_metrics_and_rate_limits(two_workers, token):
    first, second = two_workers
    run_id = "6a0c3a4e-0f1b-4f7a-9d55-3f1d2b9c8e01"

    created = first.request(
        "POST", "/api/v1/runs", {"run_id": run_id, "name": "two-workers"}, token
    )
    batches = [
        first.request("POST", f"/api/v1/runs/{run_id}/batches", make_batch([0, 1]), token),
        second.request("POST", f"/api/v1/runs/{run_id}/batches", make_batch([2, 3]), token),
    ]
    scrapes = [connection.request("GET", "/metrics")[1] for connection in (first, second)]
    # 3 of the token's 6 requests are spent; the rest alternate between the workers.
    limited = [
        connection.request("GET", "/api/v1/runs", token=token)[0]
        for connection in (first, second, first, second, first, second)
    ]
    wrong = token[:-4] + "AAAA"
    failures = [
        connection.request("GET", "/api/v1/runs", token=wrong)[0]
        for connection in (first, second, first)
    ]

    assert created[0] == 201, created
    assert [status for status, _ in batches] == [200, 200], batches
    for text in scrapes:  # each worker reports both workers' counters, and the stored run
        samples = 2 * (5 + 2 * 2)  # 5 run-level and 2 per-layer metrics for 2 layers, 2 steps
        assert _metric(text, "gradwatch_ingest_samples_total") == 2 * samples
        assert _metric(text, "gradwatch_ingest_request_duration_seconds_count") == 2
        assert _metric(text, "gradwatch_run_step", {"run_id": run_id}) == 3
    assert limited == [200, 200, 200, 429, 429, 429]
    assert failures == [401, 401, 429]
