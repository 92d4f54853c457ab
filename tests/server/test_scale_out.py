"""Scale-out over one PostgreSQL: two ``gradwatch server`` processes on two ports (and one
server with ``--workers 2``) act as one server.

Each run's batches go to either process at random (seeded), from one thread per run as an
agent sends them, all runs at once; with resends raced to both processes at the same
moment, stale resends that arrive after the next batch, resends of stored steps under a new
batch id, and one batch of one run held back and delivered last (a gap filled late). Then:

* every step of every run is stored exactly once (read back over REST from both processes,
  and the acknowledged sample counts add up to what was sent);
* detector events, detection counts and run totals equal those of one in-process server that
  received each run's batches once, in the order they first arrived;
* ``/metrics`` of both processes gives the same run families (the scrape cache off).

Real console-script processes on 127.0.0.1, the session's throwaway PostgreSQL cluster
(``tests/server/postgres.py``); every wait is bounded. A last test stores a new project's
detector thresholds from two sessions at once (two processes' ``PUT``), which was a 500.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from gradwatch.server.detect import DetectorConfig
from gradwatch.server.detect.service import get_detector_config, set_detector_config
from gradwatch.server.store import events as event_store
from gradwatch.server.store.db import Database, create_db_engine
from tests.server.conftest import PostgresServer
from tests.server.wire import decode_float, make_batch
from tests.server_process import WAIT_SECONDS, ServerProcess

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

_RUNS = 6
_BATCHES = 12
_STEPS = 25
_LAYERS = ("embed", "block_0/dense", "block_1/dense", "head")
_PROJECT = "scale-out"
_DETECTORS = {
    "thresholds": {
        "explosion": {"warmup_steps": 20},
        "loss": {"warmup_steps": 20},
        "vanishing": {"consecutive_steps": 5},
        "clip_rate": {"window_steps": 20},
        "cooldown_steps": 10,
    }
}
_LATE = (0, 5)
"""(run, batch) held back and delivered after the run's other batches: a gap filled late."""
_HEADERS = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
_ENV = {"GRADWATCH_METRICS_CACHE_SECONDS": "0"}
_TIMEOUT = httpx.Timeout(30.0)
_LIMITS = httpx.Limits(keepalive_expiry=2.0)
"""Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so a
request never races the server closing its connection."""
_VOLATILE = {
    "gradwatch_run_last_ingest_timestamp_seconds",  # ingest time differs from the reference
    "gradwatch_global_grad_norm_window_max",  # windows of ingest time, likewise
}


@dataclass
class _Sent:
    """What the clients of one run sent and were told."""

    first_order: list[int] = field(default_factory=list)
    """Batch indexes in the order of their first delivery."""
    statuses: list[int] = field(default_factory=list)
    stored_samples: int = 0
    raced_stored: list[int] = field(default_factory=list)
    """Per raced pair, how many of the two replies stored the batch."""


def _run_bodies(index: int) -> list[dict[str, Any]]:
    """One run's batches: lognormal norms with an explosion, non-finite values, a vanishing
    stretch and a clipped stretch, so every rule fires."""
    rng = np.random.default_rng(100 + index)
    total = _BATCHES * _STEPS
    grad = rng.lognormal(0.0, 0.2, size=(total, len(_LAYERS)))
    nonfinite = np.zeros((total, len(_LAYERS)), np.int64)
    grad[150 + index, 0] *= 300.0  # explosion
    grad[60 + 7 * index, 1] = math.inf  # non-finite …
    nonfinite[60 + 7 * index, 1] = 2
    grad[126, 1] = math.nan  # … in the late batch of run 0 too
    nonfinite[126, 1] = 1
    grad[200:212, 2] = 1e-9  # vanishing
    glob = np.sqrt(np.nansum(grad**2, axis=1))
    glob[np.isinf(grad).any(axis=1) | np.isnan(grad).any(axis=1)] = math.inf
    clip = np.ones(total)
    clip[230:262] = 0.5  # clip rate
    bodies = []
    for batch in range(_BATCHES):
        rows = slice(batch * _STEPS, (batch + 1) * _STEPS)
        steps = list(range(batch * _STEPS, (batch + 1) * _STEPS))
        bodies.append(
            make_batch(
                steps,
                _LAYERS,
                grad_norm=grad[rows].tolist(),
                global_norm=glob[rows].tolist(),
                clip_coef=clip[rows].tolist(),
                nonfinite=nonfinite[rows].tolist(),
            )
        )
    return bodies


def _gzip(body: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(body, allow_nan=False).encode())


def _samples(body: dict[str, Any]) -> int:
    """Samples a batch carries: 5 run-level fields and 2 per layer, per step."""
    return len(body["step"]) * (5 + 2 * len(body["layers"]))


class _Cluster:
    """Clients to the processes under test, one ``httpx.Client`` per thread and process."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[httpx.Client] = []

    def client(self, index: int) -> httpx.Client:
        clients: dict[int, httpx.Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if index not in clients:
            clients[index] = httpx.Client(
                base_url=self.urls[index], timeout=_TIMEOUT, limits=_LIMITS
            )
            with self._lock:
                self._opened.append(clients[index])
        return clients[index]

    def post_batch(self, index: int, run_id: str, body: dict[str, Any]) -> httpx.Response:
        path = f"/api/v1/runs/{run_id}/batches"
        return self.client(index).post(path, content=_gzip(body), headers=_HEADERS)

    def close(self) -> None:
        """Close every client any thread opened."""
        with self._lock:
            opened, self._opened = self._opened, []
        for client in opened:
            client.close()


def _race(
    cluster: _Cluster, send: Callable[[_Cluster, int], httpx.Response]
) -> list[httpx.Response]:
    """``send(own clients, i)`` for i = 0 and 1 from two threads released together, each
    with fresh connections (so neither waits behind the other's keep-alive connection)."""
    barrier = threading.Barrier(2, timeout=WAIT_SECONDS)
    clusters = [_Cluster(cluster.urls) for _ in range(2)]

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return send(clusters[i], i)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(one, range(2), timeout=WAIT_SECONDS))
    finally:
        for own in clusters:
            own.close()


def _stream_run(cluster: _Cluster, index: int, run_id: str, bodies: list[dict[str, Any]]) -> _Sent:
    """Send one run's batches as an agent would, in step order from this thread, to random
    processes, with resends of every kind (seeded per run)."""
    rng = random.Random(index)
    sent = _Sent()
    n = len(cluster.urls)
    stale: list[dict[str, Any]] = []

    def record(response: httpx.Response) -> None:
        sent.statuses.append(response.status_code)
        if response.status_code == 200:
            sent.stored_samples += response.json()["stored_samples"]

    def first_delivery(batch: int) -> None:
        body = bodies[batch]
        sent.first_order.append(batch)
        roll = rng.random()
        if roll < 0.25:  # the same batch at both processes at once
            replies = _race(cluster, lambda c, i: c.post_batch(i % n, run_id, body))
            for reply in replies:
                record(reply)
            sent.raced_stored.append(
                sum(r.status_code == 200 and not r.json()["duplicate"] for r in replies)
            )
        else:
            record(cluster.post_batch(rng.randrange(n), run_id, body))
        for old in stale:  # a timed-out attempt that arrives after the next batch
            reply = cluster.post_batch(rng.randrange(n), run_id, old)
            record(reply)
            assert reply.json()["duplicate"] is True, reply.text
        stale.clear()
        if roll >= 0.8:
            stale.append(body)
        elif roll >= 0.65:  # the same steps under a new batch id (a replayed local file)
            again = {**body, "batch_id": str(uuid.uuid4())}
            reply = cluster.post_batch(rng.randrange(n), run_id, again)
            record(reply)
            assert reply.json()["duplicate"] is True, reply.text

    order = [b for b in range(len(bodies)) if (index, b) != _LATE]
    for batch in order:
        first_delivery(batch)
    if _LATE[0] == index:
        first_delivery(_LATE[1])
    for old in stale:
        record(cluster.post_batch(rng.randrange(n), run_id, old))
    record(cluster.post_batch(rng.randrange(n), run_id, bodies[0]))  # a very stale resend
    return sent


def _events(client: httpx.Client | TestClient, run_id: str) -> list[tuple[Any, ...]]:
    """Every event of a run, without ids and timestamps, in a fixed order."""
    found: list[tuple[Any, ...]] = []
    cursor = None
    for _ in range(100):  # pages of 1000: bounded
        params: dict[str, Any] = {"limit": 1000}
        if cursor is not None:
            params["cursor"] = cursor
        response = client.get(f"/api/v1/runs/{run_id}/events", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        for event in page["events"]:
            found.append(
                (
                    event["rule"],
                    event["layer"],
                    event["severity"],
                    event["first_step"],
                    event["last_step"],
                    event["count"],
                    event["value"],
                    event["baseline"],
                    json.dumps(event["onset"], sort_keys=True),
                )
            )
        cursor = page["next_cursor"]
        if cursor is None:
            return sorted(found, key=repr)
    raise AssertionError("more than 100 pages of events")


def _raw_series(client: httpx.Client, run_id: str, metric: str, layer: str | None = None) -> Any:
    """Every stored value of a series, paged (``raw=true``)."""
    steps: list[int] = []
    values: list[Any] = []
    start = 0
    for _ in range(100):
        params: dict[str, Any] = {"metric": metric, "raw": "true", "max_points": 1000}
        params["start"] = start
        if layer is not None:
            params["layer"] = layer
        response = client.get(f"/api/v1/runs/{run_id}/series", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        steps.extend(body["step"])
        values.extend(body["value"])
        if body["next_start"] is None:
            return steps, values
        start = body["next_start"]
    raise AssertionError("more than 100 pages of a series")


def _run_families(text: str, *, volatile: bool) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Samples of every run-labelled family (``run_id`` label), by name and labels."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "run_id" not in sample.labels or (not volatile and sample.name in _VOLATILE):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = "NaN" if math.isnan(sample.value) else sample.value
    return samples


def _reference(url: str, run_ids: list[str], bodies: list[list[dict[str, Any]]], sent: list[_Sent]):
    """One in-process server fed each run's batches once, in their first-arrival order."""
    settings = Settings(database_url=url, metrics_cache_seconds=0)
    with TestClient(create_app(settings)) as client:
        put = client.put(f"/api/v1/projects/{_PROJECT}/detectors", json=_DETECTORS)
        assert put.status_code == 200, put.text
        for run_id in run_ids:
            body = {"run_id": run_id, "name": "scale", "project": _PROJECT}
            assert client.post("/api/v1/runs", json=body).status_code == 201
        for run_id, run_bodies, run_sent in zip(run_ids, bodies, sent, strict=True):
            for batch in run_sent.first_order:
                response = client.post(
                    f"/api/v1/runs/{run_id}/batches",
                    content=_gzip(run_bodies[batch]),
                    headers=_HEADERS,
                )
                assert response.status_code == 200, response.text
        return {
            "events": {run_id: _events(client, run_id) for run_id in run_ids},
            "health": {
                run_id: client.get(f"/api/v1/runs/{run_id}/health").json()["detections"]
                for run_id in run_ids
            },
            "runs": {run_id: _run_totals(client, run_id) for run_id in run_ids},
            "metrics": _run_families(client.get("/metrics").text, volatile=False),
        }


def _run_totals(client: httpx.Client | TestClient, run_id: str) -> dict[str, Any]:
    run = client.get(f"/api/v1/runs/{run_id}").json()
    return {key: value for key, value in run.items() if not key.endswith("_at")}


@pytest.fixture(params=["two_servers", "two_workers"])
def processes(
    request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path: Path
) -> Iterator[tuple[list[str], str]]:
    """The processes under test over one fresh database: their URLs (one per process to pick
    from) and a second fresh database for the reference server."""
    cluster = postgres.cluster
    url = cluster.create_database(template=postgres.template)
    reference = cluster.create_database(template=postgres.template)
    command = (sys.executable, "-m", "gradwatch.server.cli")
    if request.param == "two_servers":
        servers = [
            ServerProcess(tmp_path / f"server-{i}.db", command=command, env=_ENV, database_url=url)
            for i in range(2)
        ]
    else:
        servers = [
            ServerProcess(
                tmp_path / "workers.db",
                command=command,
                args=["--workers", "2"],
                env=_ENV,
                database_url=url,
            )
        ]
    try:
        for server in servers:
            server.start()
        urls = [server.url for server in servers]
        yield urls * (2 // len(urls)), reference
    finally:
        for server in servers:
            server.stop()
        for name in (url, reference):
            cluster.drop_database(name.rsplit("/", 1)[1])


def test_scale_out_stores_every_step_once_and_detects_as_one_server(processes):
    urls, reference_url = processes
    cluster = _Cluster(urls)
    run_ids = [str(uuid.uuid4()) for _ in range(_RUNS)]
    bodies = [_run_bodies(i) for i in range(_RUNS)]
    try:
        put = cluster.client(0).put(f"/api/v1/projects/{_PROJECT}/detectors", json=_DETECTORS)
        assert put.status_code == 200, put.text
        for run_id in run_ids:  # the agent's create, raced to both processes
            body = {"run_id": run_id, "name": "scale", "project": _PROJECT}
            created = _race(
                cluster, lambda c, i, body=body: c.client(i).post("/api/v1/runs", json=body)
            )
            assert sorted(r.status_code for r in created) == [200, 201], [r.text for r in created]

        with ThreadPoolExecutor(max_workers=_RUNS) as pool:
            futures = [
                pool.submit(_stream_run, cluster, i, run_ids[i], bodies[i]) for i in range(_RUNS)
            ]
            sent = [future.result(timeout=WAIT_SECONDS * 4) for future in futures]

        expected = _reference(reference_url, run_ids, bodies, sent)
        scrapes = [
            _run_families(cluster.client(i).get("/metrics").text, volatile=True)
            for i in range(len(urls))
        ]
        for run_sent in sent:
            assert set(run_sent.statuses) == {200}, run_sent.statuses
            assert run_sent.raced_stored == [1] * len(run_sent.raced_stored)
        assert any(run_sent.raced_stored for run_sent in sent), "no batch was raced"
        total = _BATCHES * _STEPS
        for run_id, run_bodies, run_sent in zip(run_ids, bodies, sent, strict=True):
            assert run_sent.stored_samples == sum(_samples(b) for b in run_bodies)
            for i in range(len(urls)):
                client = cluster.client(i)
                steps, values = _raw_series(client, run_id, "global_norm")
                assert steps == list(range(total))
                sent_norms = [decode_float(v) for b in run_bodies for v in b["global_norm"]]
                assert [decode_float(v) for v in values] == pytest.approx(sent_norms, rel=1e-6)
                steps, _ = _raw_series(client, run_id, "grad_norm", _LAYERS[-1])
                assert steps == list(range(total))
                assert _events(client, run_id) == expected["events"][run_id]
                health = client.get(f"/api/v1/runs/{run_id}/health").json()
                assert health["detections"] == expected["health"][run_id]
                assert _run_totals(client, run_id) == expected["runs"][run_id]
        assert all(expected["events"].values()), "some run had no event"
        assert scrapes[0] == scrapes[1]
        stable = {k: v for k, v in scrapes[0].items() if k[0] not in _VOLATILE}
        assert stable == expected["metrics"]
    finally:
        cluster.close()


def test_scale_out_detector_thresholds_of_a_new_project_set_by_two_processes_at_once(postgres):
    """Two processes store the first thresholds of a project at the same moment: the second
    waits on the first's new row, then replaces it (before: a unique violation, a 500)."""
    cluster = postgres.cluster
    url = cluster.create_database(template=postgres.template)
    engine = create_db_engine(url)
    database = Database(engine)
    first = DetectorConfig.model_validate({"thresholds": {"cooldown_steps": 11}})
    second = DetectorConfig.model_validate({"thresholds": {"cooldown_steps": 22}})
    now = datetime.now(UTC)
    try:
        with database.write_session() as holder, ThreadPoolExecutor(max_workers=1) as pool:
            holder.begin()
            event_store.put_project_detectors(holder, "new", first.model_dump(mode="json"), now)
            holder.flush()  # the row exists, uncommitted: the other insert must wait for it

            def other_process() -> DetectorConfig:
                with database.write_session() as session:
                    return set_detector_config(session, "new", second, now)

            waiting = pool.submit(other_process)
            _wait_for_lock_wait(engine, timeout=WAIT_SECONDS)
            holder.commit()
            assert waiting.result(timeout=WAIT_SECONDS) == second
        with database.read_session() as session:
            assert get_detector_config(session, "new") == second
    finally:
        engine.dispose()
        cluster.drop_database(url.rsplit("/", 1)[1])


def _wait_for_lock_wait(engine: Any, timeout: float) -> None:
    """Poll until some connection of the database waits for a lock (bounded)."""
    deadline = time.monotonic() + timeout
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            if connection.execute(query).scalar_one():
                return
            connection.rollback()
            threading.Event().wait(0.02)  # the poll's pause
    raise AssertionError("the second writer never waited for the first")
