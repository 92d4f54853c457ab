"""Server storage benchmark: ingest throughput, series query latency, bytes per sample.

For each backend (SQLite, and PostgreSQL when its binaries are installed or ``--postgres-url``
is given):

* **HTTP ingest**: a real uvicorn server on 127.0.0.1 (``EmbeddedServer``); one client posts
  pre-built gzip ``StepBatch`` bodies of ``--steps`` steps × ``--layers`` layers, one
  after the other, as one agent does, for each body in ``--bodies`` (JSON, and the binary body
  of ``gradwatch.wire.binary`` the agent sends), each into its own new database, to a run that
  already holds ``--preload-steps`` steps
  (posted untimed first: a run's cost per batch grows until its blocks fill their pages).
  Samples/s = stored samples / wall time (request decoding, validation, block encoding and
  the transaction all included). On a shared
  machine wall time swings with other jobs, so beside it: samples per CPU second and CPU ms
  per batch, of this process (the server's threads and the client, ``time.process_time``) +
  of the PostgreSQL server processes (``/proc``; 0 for SQLite, which runs in-process).
* **ORM baseline**: the database-only path a plain SQLAlchemy app would take for the same
  blocks: ``session.add_all(Block(...) for every block)`` and a commit per batch, no HTTP and
  no validation. The ratio HTTP / ORM is printed beside it.
* **Agent encoding**: the agent's CPU time to encode one such batch as each body (median).
* **Query**: one run of ``--query-steps`` steps (blocks of ``--steps`` steps, one layer),
  ``GET /series?metric=grad_norm&layer=…&max_points=2000`` over the whole range via HTTP;
  median and best of ``--query-repeats``.
* **Bytes per sample**: the size of the HTTP-ingested database (SQLite: the file after
  ``VACUUM``, indexes included; PostgreSQL: ``pg_total_relation_size`` of gradwatch's tables)
  divided by stored samples, and by float samples only (per-layer non-finite counts are
  mostly zero and cost almost nothing).

PostgreSQL runs with its default durability (fsync on) in a throwaway cluster on 127.0.0.1.

    python -m bench.ingest [--batches 40] [--layers 500] [--steps 50] [--query-steps 1000000]
        [--preload-steps 20000] [--bodies json,binary] [--sqlite-checkpoint-pages N] [--http-only]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import insert, make_url, text
from sqlalchemy.orm import Session

from bench.cpu import child_pids, find_postmaster, process_seconds
from gradwatch.agent.records import StepBatch as AgentBatch
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.ingest.batch import IngestOptions, ingest_batches, prepare_batch
from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store import db as db_module
from gradwatch.server.store import series as series_store
from gradwatch.server.store.db import (
    SQLITE_CHECKPOINT_PAGES,
    Database,
    create_db_engine,
    upgrade_database,
)
from gradwatch.server.store.models import Block
from gradwatch.wire.binary import COLUMNS, MEDIA_TYPE, pack
from tests.fakes import sqlite_file_bytes

_LIMITS = IngestOptions(max_steps=100_000, max_layers=10_000)
_TABLES = ("runs", "series", "blocks", "batches", "dropped_batches")


def _batch(first: int, steps: int, layers: list[str], rng: np.random.Generator) -> dict[str, Any]:
    """One agent-like batch: lognormal norms, a few non-finite counts."""
    step = list(range(first, first + steps))
    grad = rng.lognormal(0.0, 0.5, size=(steps, len(layers))).astype(np.float32)
    nonfinite = np.zeros((steps, len(layers)), dtype=np.int64)
    nonfinite[rng.integers(0, steps), rng.integers(0, len(layers))] = 3
    glob = np.sqrt((grad.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
    coef = np.minimum(1.0, 1.0 / glob).astype(np.float32)
    return {
        "schema": 1,
        "batch_id": str(uuid.uuid4()),
        "layers": layers,
        "step": step,
        "loss": rng.random(steps).astype(np.float32).tolist(),
        "global_norm": glob.tolist(),
        "global_norm_clipped": np.minimum(glob, 1.0).tolist(),
        "clip_coef": coef.tolist(),
        "skipped": [False] * steps,
        "grad_norm": grad.tolist(),
        "nonfinite": nonfinite.tolist(),
    }


def _gzip(body: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(body, separators=(",", ":")).encode(), compresslevel=1)


def _gzip_binary(body: dict[str, Any]) -> bytes:
    """The same batch as the binary body, gzipped at the agent's level."""
    fields = {key: body[key] for key in ("schema", "batch_id", "layers")}
    columns = {name: np.asarray(body[name]) for name in COLUMNS if name in body}
    return gzip.compress(pack(fields, columns), compresslevel=1)


_ENCODERS = {"json": (_gzip, "application/json"), "binary": (_gzip_binary, MEDIA_TYPE)}


@contextmanager
def postgres_databases(url: str | None) -> Iterator[Any]:
    """Yield a function that makes a fresh PostgreSQL database URL, or None if unavailable."""
    if url is not None:
        counter = iter(range(1_000_000))

        def make_external() -> str:
            base = url.rsplit("/", 1)[0]
            name = f"gw_bench_{next(counter)}_{uuid.uuid4().hex[:8]}"
            engine = create_db_engine(url)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text(f'CREATE DATABASE "{name}"'))
            engine.dispose()
            return f"{base}/{name}"

        yield make_external
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
    from tests.server.postgres import PostgresCluster, find_postgres_bin

    bin_dir = find_postgres_bin()
    if bin_dir is None:
        yield None
        return
    with PostgresCluster(bin_dir, durable=True) as cluster:
        yield cluster.create_database


@dataclass(frozen=True, slots=True)
class _HttpResult:
    seconds: float
    stored: int
    cpu_seconds: float
    """CPU of this process (the server's threads and the client) while posting."""
    database_cpu_seconds: float
    """CPU of the PostgreSQL server processes while posting (0 for SQLite)."""
    latencies: list[float]
    """Seconds of each timed request, from send to reply."""


def _http_ingest(
    url: str, bodies: list[tuple[bytes, int]], preload: Iterator[bytes], media_type: str
) -> _HttpResult:
    """Post every body; time all but the first, which creates the run's series. The
    ``preload`` bodies are posted first, untimed: the run then holds their steps, as a run
    that has trained for a while does (its blocks spread over more pages)."""
    headers = {"Content-Type": media_type, "Content-Encoding": "gzip"}
    with (
        EmbeddedServer(Settings(database_url=url)) as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        run_id = str(uuid.uuid4())
        client.post("/api/v1/runs", json={"run_id": run_id, "name": "bench"}).raise_for_status()
        path = f"/api/v1/runs/{run_id}/batches"
        for body in preload:
            client.post(path, content=body, headers=headers).raise_for_status()
        client.post(path, content=bodies[0][0], headers=headers).raise_for_status()
        stored = 0
        latencies = []
        database_before = _database_cpu(url)
        cpu_before = time.process_time()
        started = time.perf_counter()
        for body, _ in bodies[1:]:
            sent = time.perf_counter()
            response = client.post(path, content=body, headers=headers)
            latencies.append(time.perf_counter() - sent)
            response.raise_for_status()
            stored += response.json()["stored_samples"]
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        database = {pid: s - database_before.get(pid, 0.0) for pid, s in _database_cpu(url).items()}
        return _HttpResult(seconds, stored, cpu, sum(database.values()), latencies)


def _database_cpu(url: str) -> dict[int, float]:
    """CPU seconds so far of each process of the PostgreSQL server at ``url`` (none for
    SQLite, which runs inside this process)."""
    if url.startswith("sqlite"):
        return {}
    postmaster = find_postmaster(make_url(url).port or 5432)
    if postmaster is None:
        return {}
    return {pid: process_seconds(pid) for pid in [postmaster, *child_pids(postmaster)]}


def _orm_baseline(url: str, batches: list[dict[str, Any]]) -> tuple[float, int]:
    """Store the same blocks with ``Session.add_all`` of ORM objects, one commit per batch."""
    upgrade_database(url)
    engine = create_db_engine(url)
    database = Database(engine)
    try:
        run_id = str(uuid.uuid4())
        with database.write_session() as session:
            create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="orm"), _now())
        with database.write_session() as session:
            ingest_batches(session, run_id, [StepBatch.model_validate(batches[0])], _LIMITS, _now())
        with database.read_session() as session:
            ids = {
                (metric, layer): series_id
                for series_id, metric, layer in session.execute(
                    text("SELECT id, metric, layer FROM series WHERE run_id = :r"), {"r": run_id}
                )
            }
        prepared = [prepare_batch(StepBatch.model_validate(b), _LIMITS) for b in batches[1:]]
        stored = 0
        elapsed = 0.0
        for item in prepared:
            started = time.perf_counter()
            with Session(engine) as session:
                objects = []
                for metric in item.metrics:
                    blocks = metric.blocks
                    for j, layer in enumerate(metric.layers):
                        count = int(blocks.count[j])
                        if count == 0:
                            continue
                        objects.append(
                            Block(
                                series_id=ids[(metric.metric.value, layer)],
                                first_step=int(blocks.first_step[j]),
                                last_step=int(blocks.last_step[j]),
                                count=count,
                                nan_count=int(blocks.nan_count[j]),
                                vmin=_none_if_nan(blocks.vmin[j]),
                                vmax=_none_if_nan(blocks.vmax[j]),
                                vlast=_none_if_nan(blocks.vlast[j]),
                                steps=blocks.steps[j],
                                values=blocks.values[j],
                            )
                        )
                        stored += count
                session.add_all(objects)
                session.commit()
            elapsed += time.perf_counter() - started
        return elapsed, stored
    finally:
        engine.dispose()


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _agent_encoding_ms(body: dict[str, Any], repeats: int = 21) -> dict[str, float]:
    """Median ms the agent's sender thread spends turning one batch into each body: for JSON
    ``to_wire``, ``json.dumps`` and gzip; for binary ``to_binary`` and gzip (both at level 1,
    as ``HttpTransport`` sends them)."""
    n = len(body["step"])
    batch = AgentBatch(
        layers=tuple(body["layers"]),
        step=np.asarray(body["step"], np.int64),
        loss=np.asarray(body["loss"], np.float32),
        loss_known=np.ones(n, np.bool_),
        global_norm=np.asarray(body["global_norm"], np.float32),
        global_norm_clipped=np.asarray(body["global_norm_clipped"], np.float32),
        clip_coef=np.asarray(body["clip_coef"], np.float32),
        skipped=np.asarray(body["skipped"], np.bool_),
        grad_norm=np.asarray(body["grad_norm"], np.float32),
        nonfinite=np.asarray(body["nonfinite"], np.int64),
    )
    encoders = {
        "json": lambda: gzip.compress(
            json.dumps(batch.to_wire(), separators=(",", ":"), allow_nan=False).encode(), 1
        ),
        "binary": lambda: gzip.compress(batch.to_binary(), 1),
    }
    times: dict[str, list[float]] = {kind: [] for kind in encoders}
    for _ in range(repeats):
        for kind, encode in encoders.items():
            started = time.perf_counter()
            encode()
            times[kind].append(time.perf_counter() - started)
    return {kind: 1000 * statistics.median(values) for kind, values in times.items()}


def _now() -> datetime:
    return datetime.now(UTC)


def _load_long_run(url: str, steps: int, block: int) -> tuple[str, str]:
    """Store one run of ``steps`` steps × 1 layer in blocks of ``block`` steps (one spike)."""
    upgrade_database(url)
    engine = create_db_engine(url)
    database = Database(engine)
    rng = np.random.default_rng(1)
    layer = "model/dense"
    spike = steps * 2 // 3 + 7
    try:
        run_id = str(uuid.uuid4())
        with database.write_session() as session:
            create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="long"), _now())
        per_transaction = 200
        for first in range(0, steps, block * per_transaction):
            batches = []
            for lo in range(first, min(first + block * per_transaction, steps), block):
                body = _batch(lo, min(block, steps - lo), [layer], rng)
                if lo <= spike < lo + block:
                    body["grad_norm"][spike - lo][0] = 1e6
                batches.append(StepBatch.model_validate(body))
            with database.write_session() as session:
                ingest_batches(session, run_id, batches, _LIMITS, _now())
        return run_id, layer
    finally:
        engine.dispose()


def _query(url: str, run_id: str, layer: str, repeats: int) -> tuple[float, float]:
    """Median and best milliseconds of the 2000-bucket query over the whole run."""
    times = []
    with (
        EmbeddedServer(Settings(database_url=url)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        params = {"metric": "grad_norm", "layer": layer, "max_points": 2000}
        path = f"/api/v1/runs/{run_id}/series"
        for _ in range(repeats + 1):
            started = time.perf_counter()
            response = client.get(path, params=params)
            times.append(time.perf_counter() - started)
            response.raise_for_status()
            body = response.json()
            assert body["downsampled"], "1M steps into 2000 points must be bucketed"
            assert len(body["step"]) <= 2000
            assert max(body["max"]) == 1e6, "the spike must show"
    times = times[1:]  # the first query warms caches
    return statistics.median(times) * 1000, min(times) * 1000


def _size_bytes(url: str) -> int:
    if url.startswith("sqlite"):
        return sqlite_file_bytes(url.removeprefix("sqlite:///"))
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                sum(
                    connection.execute(
                        text("SELECT pg_total_relation_size(:t)"), {"t": table}
                    ).scalar_one()
                    for table in _TABLES
                )
            )
    finally:
        engine.dispose()


def _insert_rows(connection: Any, table: Any, names: Any, rows: Any) -> None:
    connection.execute(insert(table), [dict(zip(names, row, strict=True)) for row in rows])


def _sqlite_factory(workdir: Path) -> Any:
    counter = iter(range(1_000_000))

    def make() -> str:
        return f"sqlite:///{workdir / f'bench-{next(counter)}.db'}"

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches posted per backend")
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50, help="steps per batch")
    parser.add_argument("--query-steps", type=int, default=1_000_000)
    parser.add_argument("--query-repeats", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--bodies",
        default="json,binary",
        help="request bodies to time HTTP ingest with, side by side: json, binary",
    )
    parser.add_argument("--postgres-url", default=None, help="use this server, not a new one")
    parser.add_argument(
        "--preload-steps",
        type=int,
        default=20_000,
        help="steps the run holds before HTTP ingest is timed (posted untimed): a run's "
        "per-batch cost grows with its stored blocks until they fill their pages",
    )
    parser.add_argument(
        "--sqlite-checkpoint-pages",
        type=int,
        default=None,
        help="override SQLite's wal_autocheckpoint (the server's: "
        f"{SQLITE_CHECKPOINT_PAGES}; SQLite's default: 1000), to compare",
    )
    parser.add_argument(
        "--http-only",
        action="store_true",
        help="time HTTP ingest only (no ORM baseline, query or size): for profiling, e.g. "
        "py-spy record --gil --format raw -o ingest.txt -- python -m bench.ingest --http-only",
    )
    parser.add_argument(
        "--postgres-insert",
        choices=("copy", "executemany"),
        default="copy",
        help="how blocks reach PostgreSQL: binary COPY (the server's path) or, to compare, "
        "SQLAlchemy's executemany (multi-row INSERT ... VALUES)",
    )
    args = parser.parse_args()
    if args.postgres_insert == "executemany":
        series_store._copy_rows = _insert_rows  # type: ignore[assignment]
    if args.sqlite_checkpoint_pages is not None:
        db_module.SQLITE_CHECKPOINT_PAGES = args.sqlite_checkpoint_pages

    rng = np.random.default_rng(0)
    layers = [f"model/block_{i}/dense" for i in range(args.layers)]
    first = args.preload_steps // args.steps * args.steps  # the timed steps follow the preload
    batches = [
        _batch(first + i * args.steps, args.steps, layers, rng) for i in range(args.batches + 1)
    ]
    kinds = args.bodies.split(",")
    bodies = {kind: [(_ENCODERS[kind][0](b), len(b["step"])) for b in batches] for kind in kinds}
    float_fraction = (args.layers + 4) / (2 * args.layers + 5)
    sizes = ", ".join(
        f"{np.mean([len(body) for body, _ in bodies[kind]]) / 1024:.0f} KiB gzip {kind}"
        for kind in kinds
    )
    print(
        f"{args.batches} batches of {args.steps} steps × {args.layers} layers "
        f"({(2 * args.layers + 5) * args.steps} samples; {sizes} each), "
        f"timed after {first:,} steps"
    )
    encoding = _agent_encoding_ms(batches[0])
    print(
        "the agent's encoding of one batch (its sender thread, median of 21): "
        + ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in encoding.items())
    )
    workdir = Path(tempfile.mkdtemp(prefix="gradwatch-bench-"))
    rows = []
    try:
        with postgres_databases(args.postgres_url) as make_postgres:
            for backend in args.backends.split(","):
                if backend == "sqlite":
                    make = _sqlite_factory(workdir)
                elif make_postgres is None:
                    print(
                        "postgresql: skipped (no PostgreSQL binaries; apt-get install postgresql)"
                    )
                    continue
                else:
                    make = make_postgres
                http: dict[str, tuple[float, float, tuple[float, float]]] = {}
                for kind in kinds:
                    http_url = make()
                    encode, media_type = _ENCODERS[kind]
                    preload = (
                        encode(_batch(step, args.steps, layers, rng))
                        for step in range(0, first, args.steps)
                    )
                    result = _http_ingest(http_url, bodies[kind], preload, media_type)
                    stored = result.stored
                    http[kind] = (
                        stored / result.seconds,
                        stored / (result.cpu_seconds + result.database_cpu_seconds),
                        (
                            1000 * result.cpu_seconds / args.batches,
                            1000 * result.database_cpu_seconds / args.batches,
                        ),
                    )
                    p50, p99 = np.percentile(result.latencies, [50, 99]) * 1000
                    print(
                        f"{backend}, {kind} body: HTTP ingest {http[kind][0]:,.0f} samples/s, "
                        f"{http[kind][1]:,.0f} samples per CPU second, a request p50 {p50:.1f} "
                        f"/ p99 {p99:.1f} / max {max(result.latencies) * 1000:.1f} ms",
                        flush=True,
                    )
                if args.http_only:
                    continue
                size = _size_bytes(http_url)
                total_samples = stored * (args.batches + 1 + first // args.steps) / args.batches
                orm_seconds, orm_stored = _orm_baseline(make(), batches)
                orm_rate = orm_stored / orm_seconds
                query_url = make()
                run_id, layer = _load_long_run(query_url, args.query_steps, args.steps)
                median_ms, best_ms = _query(query_url, run_id, layer, args.query_repeats)
                for kind, (http_rate, cpu_rate, cpu_ms) in http.items():
                    rows.append(
                        (
                            backend,
                            kind,
                            http_rate,
                            cpu_rate,
                            cpu_ms,
                            orm_rate,
                            http_rate / orm_rate,
                            median_ms,
                            best_ms,
                            size / total_samples,
                            size / (total_samples * float_fraction),
                        )
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.http_only:
        return
    print(
        f"{'backend':<11} {'body':<7} {'HTTP samples/s':>15} {'per CPU s':>10} "
        f"{'CPU ms/batch':>14} {'ORM add_all/s':>14} {'ratio':>6} "
        f"{'query ms (median/best)':>23} {'B/sample':>9} {'B/float sample':>15}"
    )
    for row in rows:
        backend, kind, http_rate, cpu_rate, (own_ms, db_ms), orm_rate, ratio = row[:7]
        median_ms, best_ms, per, per_float = row[7:]
        print(
            f"{backend:<11} {kind:<7} {http_rate:>15,.0f} {cpu_rate:>10,.0f} "
            f"{own_ms:>6.1f} + {db_ms:<5.1f} {orm_rate:>14,.0f} {ratio:>6.2f} "
            f"{median_ms:>11.1f} / {best_ms:<9.1f} {per:>9.2f} {per_float:>15.2f}"
        )


if __name__ == "__main__":
    main()
