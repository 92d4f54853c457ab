"""What ingest's memo of a run (``gradwatch.server.ingest.memo``) saves, paired batch by batch.

One run of ``--layers`` layers holds ``--preload-steps`` steps; then ``--batches`` batches of
``--steps`` steps are ingested in process (``ingest_batch``, one transaction each), alternately
with the process's memos cleared first (the batch reads the series summaries and the detector
state back from the database, as every batch did before the memo) and with the memo the
previous batch left. Each batch's CPU time (``time.process_time``: this process; PostgreSQL's
own processes are not counted) is paired with the next one's, so the slow drifts of a shared
machine cancel out; printed: the medians of both and the median of the paired ratios.

    python -m bench.ingest_memo [--backends sqlite,postgresql] [--batches 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime

import numpy as np

from bench.ingest import _LIMITS, _batch, postgres_databases
from gradwatch.server.ingest import memo
from gradwatch.server.ingest.batch import ingest_batch
from gradwatch.server.ingest.columns import BatchColumns, from_json
from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store.db import Database, create_db_engine, upgrade_database


def _paired(url: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """CPU seconds of the batches read back and of the remembered ones, in pairs."""
    upgrade_database(url)
    engine = create_db_engine(url)
    database = Database(engine)
    rng = np.random.default_rng(0)
    layers = [f"model/block_{i}/dense" for i in range(args.layers)]
    run_id = str(uuid.uuid4())

    def columns(first: int) -> BatchColumns:
        return from_json(StepBatch.model_validate(_batch(first, args.steps, layers, rng)))

    def ingest(batch: BatchColumns) -> None:
        with database.write_session() as session:
            ingest_batch(session, run_id, batch, _LIMITS, datetime.now(UTC))

    try:
        with database.write_session() as session:
            create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="memo"), datetime.now(UTC))
        for first in range(0, args.preload_steps, args.steps):
            ingest(columns(first))
        timed = [columns(args.preload_steps + k * args.steps) for k in range(2 * args.batches)]
        cpu: tuple[list[float], list[float]] = ([], [])
        for k, batch in enumerate(timed):
            remembered = k % 2
            if not remembered:
                memo.MEMOS.clear()
            start = time.process_time()
            ingest(batch)
            cpu[remembered].append(time.process_time() - start)
        return cpu
    finally:
        memo.MEMOS.clear()
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--batches", type=int, default=200, help="pairs of timed batches")
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--preload-steps", type=int, default=5_000)
    parser.add_argument("--postgres-url", default=None, help="use this server, not a new one")
    args = parser.parse_args()
    print(
        f"{args.batches} pairs of batches of {args.steps} steps × {args.layers} layers, "
        f"after {args.preload_steps:,} steps; CPU ms a batch of this process, medians"
    )
    with ExitStack() as stack:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                url = f"sqlite:///{stack.enter_context(tempfile.TemporaryDirectory())}/memo.db"
            else:
                make = stack.enter_context(postgres_databases(args.postgres_url))
                if make is None:
                    print(f"{backend}: skipped (no PostgreSQL binaries)")
                    continue
                url = make()
            read_back, remembered = _paired(url, args)
            ratios = [b / a for a, b in zip(read_back, remembered, strict=True)]
            print(
                f"{backend}: read back {1000 * statistics.median(read_back):.1f} ms, "
                f"remembered {1000 * statistics.median(remembered):.1f} ms; "
                f"paired ratio {statistics.median(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
