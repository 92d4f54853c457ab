"""Scrape benchmark: the time of ``GET /metrics`` with many live runs, against its baseline.

``--runs`` running runs of ``--layers`` layers each get ``--batches`` batches of ``--steps``
steps (stored through the server's own ingest path, detectors included); ``--batches 2,20``
repeats everything on a second database holding 10× the steps, to show that a scrape costs
the same whatever the runs hold. Then a real uvicorn server on 127.0.0.1 (``EmbeddedServer``)
with the scrape cache turned off answers ``--scrapes`` rounds of three scrapes, one after the
other as Prometheus would, each a whole HTTP request (queries, exposition, gzip, HTTP):

* ``baseline``: the path ``/metrics`` took before its own exposition (a bench-only route):
  the same three queries, every run's ``prometheus_client`` families built afresh, and
  ``prometheus_client``'s encoder (``generate_latest``);
* ``every run changed``: ``/metrics`` after every run's row changed (its
  ``last_ingest_at`` is moved, untimed, before the scrape, as if each had sent a batch), so
  every run is formatted again;
* ``no run changed``: ``/metrics`` again, every run's formatted lines reused.

``--old-runs`` adds that many finished runs last updated 30 days ago (rows only, written
straight into ``runs``), which a scrape must not read.

The median and 95th percentile of each are printed side by side, with the body size and the
number of samples (and a warning should the baseline's body differ from ``/metrics``').
Target: p95 ≤ 50 ms for 200 runs × 100 layers.

PostgreSQL runs too when its binaries are installed (a throwaway cluster on 127.0.0.1, default
durability; ``VACUUM ANALYZE`` after storing, as autovacuum would soon after).

    python -m bench.scrape [--runs 200] [--layers 100] [--batches 2,20] [--scrapes 60]
        [--old-runs 0] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, update

from bench.ingest import postgres_databases
from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.export.family import build_families, run_samples
from gradwatch.server.export.prometheus import ServerMetrics
from gradwatch.server.ingest.batch import IngestOptions, ingest_batches
from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store import scrape as scrape_store
from gradwatch.server.store.db import Database, create_db_engine, upgrade_database
from gradwatch.server.store.models import Run

_OPTIONS = IngestOptions(max_steps=100_000, max_layers=10_000)
_BASELINE_PATH = "/bench/metrics-baseline"
_MODES = ("baseline", "every run changed", "no run changed")


def _batches(
    run_index: int, batches: int, steps: int, layers: list[str], rng: np.random.Generator
) -> list[StepBatch]:
    """Agent-like batches: lognormal norms; every tenth run explodes in its last batch."""
    out = []
    for b in range(batches):
        step = list(range(b * steps, (b + 1) * steps))
        grad = rng.lognormal(0.0, 0.3, size=(steps, len(layers))).astype(np.float32)
        if run_index % 10 == 0 and b == batches - 1:
            grad[-1] *= 1e4
        glob = np.sqrt((grad.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
        out.append(
            StepBatch.model_validate(
                {
                    "schema": 1,
                    "batch_id": str(uuid.uuid4()),
                    "layers": layers,
                    "step": step,
                    "loss": rng.random(steps).tolist(),
                    "global_norm": glob.tolist(),
                    "global_norm_clipped": np.minimum(glob, 10.0).tolist(),
                    "clip_coef": np.minimum(1.0, 10.0 / glob).tolist(),
                    "skipped": [False] * steps,
                    "grad_norm": grad.tolist(),
                    "nonfinite": np.zeros((steps, len(layers)), dtype=int).tolist(),
                }
            )
        )
    return out


def _populate(url: str, runs: int, layers: int, batches: int, steps: int) -> float:
    """Store the runs; return the seconds it took."""
    upgrade_database(url)
    engine = create_db_engine(url)
    rng = np.random.default_rng(0)
    names = [f"model/block_{i}/dense" for i in range(layers)]
    started = time.perf_counter()
    try:
        database = Database(engine)
        for index in range(runs):
            run_id = str(uuid.uuid4())
            with database.write_session() as session:
                create_run(
                    session,
                    RunCreate(run_id=uuid.UUID(run_id), name=f"run-{index}", project="bench"),
                    datetime.now(UTC),
                )
            with database.write_session() as session:
                ingest_batches(
                    session,
                    run_id,
                    _batches(index, batches, steps, names, rng),
                    _OPTIONS,
                    datetime.now(UTC),
                )
    finally:
        engine.dispose()
    return time.perf_counter() - started


def _add_old_runs(url: str, count: int) -> None:
    """Insert ``count`` finished runs last updated 30 days ago (no series, no blocks)."""
    if count == 0:
        return
    engine = create_db_engine(url)
    moment = datetime.now(UTC) - timedelta(days=30)
    top = {"layers": 100, "top": [[f"model/block_{i}/dense", 1.0] for i in range(10)]}
    rows = [
        {
            "id": str(uuid.uuid4()),
            "project": "bench",
            "name": f"old-{index}",
            "status": "finished",
            "created_at": moment,
            "updated_at": moment,
            "config": {"learning_rate": 1e-3, "layers": 100},
            "last_step": 99_999,
            "last_ingest_at": moment,
            "num_steps": 100_000,
            "clipped_steps": 0,
            "skipped_steps": 0,
            "nonfinite_steps": 0,
            "nonfinite_values": 0,
            "top_layers": top,
        }
        for index in range(count)
    ]
    try:
        with engine.begin() as connection:
            connection.execute(insert(Run), rows)
    finally:
        engine.dispose()


class _BaselineCollector:
    """What ``/metrics`` did before its own exposition, on every scrape: the three queries,
    every run's ``prometheus_client`` families built afresh (nothing kept between scrapes)."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database = database
        self._settings = settings

    def collect(self) -> list[Metric]:
        now = datetime.now(UTC)
        window = {
            "finished_since": now - timedelta(seconds=self._settings.finished_run_grace_seconds),
            "ingested_since": now - timedelta(seconds=self._settings.inactive_run_seconds),
        }
        with self._database.read_session() as session:
            runs = scrape_store.scrape_runs(session, **window)
            drops = scrape_store.scrape_agent_drops(session, **window)
            detections = scrape_store.scrape_detector_counts(session, **window)
        drops_by_run: dict[str, list[tuple[str, int]]] = {}
        for run_id, reason, count in drops:
            drops_by_run.setdefault(run_id, []).append((reason, count))
        counts: dict[str, dict[tuple[str, str], int]] = {}
        for run_id, rule, severity, count in detections:
            counts.setdefault(run_id, {})[(rule, severity)] = count
        top_k = self._settings.metrics_top_k_layers
        return build_families(
            run_samples(run, counts.get(run.run_id, {}), drops_by_run.get(run.run_id, []), top_k)
            for run in runs
        )


def _analyze(url: str) -> None:
    """On PostgreSQL, ``VACUUM ANALYZE`` as autovacuum does within about a minute of a bulk
    load (before the statistics its plans for a scrape read all of ``series``: 17 vs 4 ms;
    its vacuum would otherwise run during the scrapes)."""
    if not url.startswith("postgresql"):
        return
    engine = create_db_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
    finally:
        engine.dispose()


def _baseline_app(settings: Settings) -> FastAPI:
    """The server's app plus the bench-only route that answers as ``/metrics`` did before its
    own exposition: :class:`_BaselineCollector` and ``prometheus_client``'s encoder."""
    app = create_app(settings)

    @app.get(_BASELINE_PATH, include_in_schema=False)
    def baseline(request: Request) -> Response:
        metrics: ServerMetrics = request.app.state.metrics
        registry = CollectorRegistry()
        registry.register(metrics.own_registry)
        registry.register(_BaselineCollector(request.app.state.database, settings))
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(content=encode(registry), media_type=content_type)

    return app


def _touch_every_run(url: str) -> Callable[[], None]:
    """A function that moves every run's ``last_ingest_at`` on by a microsecond (one UPDATE)."""
    engine = create_db_engine(url)
    moment = [datetime.now(UTC)]

    def touch() -> None:
        moment[0] += timedelta(microseconds=1)
        with engine.begin() as connection:
            connection.execute(update(Run).values(last_ingest_at=moment[0]))

    return touch


def _scrape(url: str, scrapes: int) -> tuple[dict[str, tuple[float, float, int, int]], bool]:
    """Per mode: (median ms, p95 ms, body bytes, samples) of ``scrapes`` uncached scrapes; and
    whether the baseline's last body has the same bytes as the last ``/metrics`` body."""
    settings = Settings(database_url=url, metrics_cache_seconds=0)
    times: dict[str, list[float]] = {mode: [] for mode in _MODES}
    bodies: dict[str, httpx.Response] = {}
    touch = _touch_every_run(url)
    with (
        EmbeddedServer(settings, app=_baseline_app(settings)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for path in ("/metrics", _BASELINE_PATH):  # warm caches and connections
            client.get(path).raise_for_status()
        for _ in range(scrapes):
            touch()
            for mode, path in zip(_MODES[1:], ("/metrics", "/metrics"), strict=True):
                started = time.perf_counter()
                bodies[mode] = client.get(path)
                times[mode].append(time.perf_counter() - started)
            started = time.perf_counter()
            bodies[_MODES[0]] = client.get(_BASELINE_PATH)
            times[_MODES[0]].append(time.perf_counter() - started)
            for response in bodies.values():
                response.raise_for_status()
    out = {}
    for mode, response in bodies.items():
        samples = sum(len(f.samples) for f in text_string_to_metric_families(response.text))
        median, p95 = np.percentile(times[mode], [50, 95]) * 1000
        out[mode] = (float(median), float(p95), len(response.content), samples)
    return out, bodies[_MODES[0]].content == bodies[_MODES[2]].content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument(
        "--batches", default="2,20", help="batches per run; a list measures each in turn"
    )
    parser.add_argument("--steps", type=int, default=50, help="steps per batch")
    parser.add_argument("--scrapes", type=int, default=60, help="rounds of the three scrapes")
    parser.add_argument("--old-runs", type=int, default=0, help="finished runs, 30 days old")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    batch_counts = [int(value) for value in args.batches.split(",")]
    print(
        f"{args.runs} running runs × {args.layers} layers, {args.steps} steps per batch; "
        f"{args.scrapes} rounds of uncached scrapes over HTTP (gzip); "
        f"{args.old_runs} old finished runs beside them"
    )
    print(
        f"{'backend':>10} {'steps/run':>9}  "
        + "  ".join(f"{mode + ' median / p95':>33}" for mode in _MODES)
        + "  body, samples"
    )
    with (
        tempfile.TemporaryDirectory(prefix="gradwatch-scrape-") as workdir,
        postgres_databases(None) as pg,
    ):
        for backend in args.backends.split(","):
            for batches in batch_counts:
                if backend == "sqlite":
                    url = f"sqlite:///{Path(workdir) / f'scrape-{batches}.db'}"
                elif pg is None:
                    print(
                        "postgresql: skipped (no PostgreSQL binaries; apt-get install postgresql)"
                    )
                    break
                else:
                    url = pg()
                seconds = _populate(url, args.runs, args.layers, batches, args.steps)
                _add_old_runs(url, args.old_runs)
                _analyze(url)
                result, same = _scrape(url, args.scrapes)
                cells = "  ".join(
                    f"{f'{result[mode][0]:.1f} / {result[mode][1]:.1f} ms':>33}" for mode in _MODES
                )
                _, _, size, samples = result[_MODES[2]]
                print(
                    f"{backend:>10} {batches * args.steps:>9}  {cells}  "
                    f"{size / 1024:.0f} KiB, {samples} (stored in {seconds:.0f} s)"
                    + ("" if same else "  BODIES DIFFER from the baseline's")
                )


if __name__ == "__main__":
    main()
