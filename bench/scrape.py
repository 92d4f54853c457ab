"""Scrape benchmark: the time of ``GET /metrics`` with many live runs.

``--runs`` running runs of ``--layers`` layers each get ``--batches`` batches of ``--steps``
steps (stored through the server's own ingest path, detectors included). Then a real uvicorn
server on 127.0.0.1 (``EmbeddedServer``) with the scrape cache turned off answers
``--scrapes`` scrapes, one after the other, as Prometheus would; the median and 95th
percentile wall time of a whole request (queries, exposition, HTTP) are printed, with the body
size and the number of series. Target: median ≤ 50 ms for 200 runs × 100 layers.

PostgreSQL runs too when its binaries are installed (a throwaway cluster on 127.0.0.1).

    python -m bench.scrape [--runs 200] [--layers 100] [--scrapes 30] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from ingest import postgres_databases  # bench/ingest.py, beside this script
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.ingest.batch import IngestOptions, ingest_batches
from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store.db import Database, create_db_engine, upgrade_database

_OPTIONS = IngestOptions(max_steps=100_000, max_layers=10_000)


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


def _scrape(url: str, scrapes: int) -> tuple[float, float, int, int]:
    """Return (median ms, p95 ms, body bytes, samples) of ``scrapes`` uncached scrapes."""
    times = []
    settings = Settings(database_url=url, metrics_cache_seconds=0)
    with (
        EmbeddedServer(settings) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        client.get("/metrics").raise_for_status()  # warm caches and connections
        for _ in range(scrapes):
            started = time.perf_counter()
            response = client.get("/metrics")
            times.append(time.perf_counter() - started)
            response.raise_for_status()
    samples = sum(len(f.samples) for f in text_string_to_metric_families(response.text))
    p95 = float(np.percentile(times, 95))
    return statistics.median(times) * 1000, p95 * 1000, len(response.content), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--batches", type=int, default=2, help="batches per run")
    parser.add_argument("--steps", type=int, default=50, help="steps per batch")
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    print(
        f"{args.runs} running runs × {args.layers} layers, {args.batches} batches of "
        f"{args.steps} steps each; {args.scrapes} uncached scrapes over HTTP"
    )
    with (
        tempfile.TemporaryDirectory(prefix="gradwatch-scrape-") as workdir,
        postgres_databases(None) as pg,
    ):
        for backend in args.backends.split(","):
            if backend == "sqlite":
                url = f"sqlite:///{Path(workdir) / 'scrape.db'}"
            elif pg is None:
                print("postgresql: skipped (no PostgreSQL binaries; apt-get install postgresql)")
                continue
            else:
                url = pg()
            seconds = _populate(url, args.runs, args.layers, args.batches, args.steps)
            median, p95, size, samples = _scrape(url, args.scrapes)
            print(
                f"{backend:>10}: /metrics median {median:.1f} ms, p95 {p95:.1f} ms, "
                f"{size / 1024:.0f} KiB, {samples} samples (stored in {seconds:.1f} s)"
            )


if __name__ == "__main__":
    main()
