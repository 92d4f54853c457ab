"""Web UI benchmark: the run page of a 500-layer × 1M-step run in headless Chromium.

Fills a SQLite database with one run of ``--layers`` layers × ``--steps`` steps in blocks of
``--block`` steps (the agent's default ``flush_every``): the first batch goes through the real
ingest (run, series, layer order, detectors), every later block is written straight into the
``blocks`` table in the store's format (packed float32 values plus summary columns), so the
fill takes minutes instead of the hour HTTP ingest would, and the chunk rollups are then
rebuilt from the blocks as migration 0004 does (timed). One layer gets a one-step spike.
Then, on a real server (``EmbeddedServer``) on 127.0.0.1:

* **server**: ``GET /heatmap`` (whole run, ``--buckets`` buckets; and a zoom to 1% of the
  run) and ``GET /series?metric=global_norm&max_points=2000`` timed over HTTP, median of
  ``--repeats``, with the bytes of each reply as sent (gzip) and decoded;
* **browser**: Debian's Chromium (Playwright, ``executable_path``) opens the run page cold
  and reports first paint with data (charts drawn), heatmap ready, the heatmap's fetch and
  draw time, and the bytes transferred for the whole page (HTML, JS, CSS and API replies).

    python -m bench.ui [--layers 500] [--steps 1000000] [--block 50] [--buckets 1000]
                       [--database PATH]   # reuse a filled database (created when missing)
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import text

from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.ingest.batch import IngestOptions, ingest_batches
from gradwatch.server.query.run import create_run
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store.db import Database, create_db_engine, upgrade_database
from gradwatch.server.store.models import RUN_LEVEL
from gradwatch.server.store.rollup import rebuild_rollups
from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS

_LIMITS = IngestOptions(max_steps=100_000, max_layers=10_000)
_RUN_FLOATS = ("global_norm", "global_norm_clipped", "clip_coef", "loss")


def _first_batch(layers: list[str], block: int) -> dict[str, Any]:
    ones = [1.0] * block
    return {
        "schema": 1,
        "batch_id": str(uuid.uuid4()),
        "layers": layers,
        "step": list(range(block)),
        "loss": ones,
        "global_norm": ones,
        "global_norm_clipped": ones,
        "clip_coef": ones,
        "skipped": [False] * block,
        "grad_norm": [[1.0] * len(layers) for _ in range(block)],
        "nonfinite": [[0] * len(layers) for _ in range(block)],
    }


def fill(path: Path, layers: int, steps: int, block: int) -> str:
    """Create the database and its one run; returns the run id."""
    url = f"sqlite:///{path}"
    upgrade_database(url)
    engine = create_db_engine(url)
    names = [f"model/block_{i // 4}/layer_{i % 4}" for i in range(layers)]
    run_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    try:
        database = Database(engine)
        with database.write_session() as session:
            create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="bench-ui"), now)
        with database.write_session() as session:
            first = StepBatch.model_validate(_first_batch(names, block))
            ingest_batches(session, run_id, [first], _LIMITS, now)
        with engine.begin() as connection:
            series = dict(
                connection.execute(
                    text("SELECT metric || '|' || layer, id FROM series WHERE run_id = :r"),
                    {"r": run_id},
                ).all()
            )
        rng = np.random.default_rng(0)
        blocks = steps // block
        spike_layer, spike_step = layers // 3, steps * 2 // 3 + 7
        targets = [(series[f"grad_norm|{name}"], i) for i, name in enumerate(names)]
        targets += [(series[f"{metric}|{RUN_LEVEL}"], -1) for metric in _RUN_FLOATS]
        raw = sqlite3_connect(path)
        started = time.perf_counter()
        for n, (series_id, index) in enumerate(targets):
            values = rng.lognormal(0.0, 0.3, size=(blocks - 1, block)).astype(np.float32)
            if index == spike_layer:
                values.reshape(-1)[spike_step - block] = 1e6
            _insert_blocks(raw, series_id, values, block)
            if n % 50 == 0:
                print(f"  filled {n}/{len(targets)} series", file=sys.stderr, flush=True)
        raw.execute(
            "UPDATE runs SET last_step = ?, num_steps = ? WHERE id = ?", (steps - 1, steps, run_id)
        )
        raw.commit()
        raw.close()
        print(f"  fill: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        started = time.perf_counter()
        with engine.begin() as connection:
            rebuild_rollups(connection)  # what migration 0004 does to a database stored before
        print(f"  rollups rebuilt: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        engine.dispose()
    return run_id


def sqlite3_connect(path: Path) -> Any:
    import sqlite3

    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=OFF")
    return connection


def _insert_blocks(connection: Any, series_id: int, values: np.ndarray, block: int) -> None:
    """Blocks 1.. of one series (block 0 came through ingest), with the running summary."""
    firsts = np.arange(1, len(values) + 1) * block
    vmin, vmax = values.min(axis=1), values.max(axis=1)
    rows = [
        (series_id, int(f), int(f) + block - 1, block, 0, float(lo), float(hi), float(v[-1]),
         None, v.tobytes())
        for f, lo, hi, v in zip(firsts, vmin, vmax, values, strict=True)
    ]  # fmt: skip
    columns = "series_id, first_step, last_step, count, nan_count, vmin, vmax, vlast"
    connection.executemany(
        f'INSERT INTO blocks ({columns}, steps, "values") VALUES (?,?,?,?,?,?,?,?,?,?)', rows
    )
    connection.execute(
        "UPDATE series SET count = count + ?, vmax = max(vmax, ?), last_step = ?, vlast = ? "
        "WHERE id = ?",
        (values.size, float(vmax.max()), int(firsts[-1]) + block - 1, float(values[-1, -1]),
         series_id),
    )  # fmt: skip
    connection.commit()


def _timed_get(client: httpx.Client, path: str, params: dict[str, Any], repeats: int) -> dict:
    times, sent = [], 0
    body = b""
    for _ in range(repeats):
        started = time.perf_counter()
        with client.stream("GET", path, params=params) as response:
            response.raise_for_status()
            wire = b"".join(response.iter_raw())
        times.append((time.perf_counter() - started) * 1000)
        sent = len(wire)
        body = gzip.decompress(wire) if response.headers.get("content-encoding") else wire
    return {"median_ms": statistics.median(times), "best_ms": min(times), "sent": sent,
            "decoded": len(body)}  # fmt: skip


def browse(url: str) -> dict[str, float]:
    """Open the run page cold in Chromium; timings (ms since navigation) and bytes."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("body[data-heatmap-ready='1']", timeout=300_000)
        out: dict[str, float] = page.evaluate(
            """() => {
              const entries = [...performance.getEntriesByType('navigation'),
                               ...performance.getEntriesByType('resource')];
              const bytes = entries.reduce((sum, e) => sum + (e.transferSize || 0), 0);
              const api = performance.getEntriesByType('resource')
                .filter(e => e.name.includes('/api/v1/'))
                .reduce((sum, e) => sum + (e.transferSize || 0), 0);
              return {...window.gradwatchTimings, bytes, apiBytes: api};
            }"""
        )
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--buckets", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gradwatch-bench-ui-"))
    path = args.database or workdir / "ui.db"
    if path.exists():
        with sqlite3_connect(path) as connection:
            (run_id,) = connection.execute("SELECT id FROM runs LIMIT 1").fetchone()
    else:
        print(f"filling {path}: {args.layers} layers × {args.steps:,} steps", file=sys.stderr)
        run_id = fill(path, args.layers, args.steps, args.block)
    print(f"database: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    with (
        EmbeddedServer(Settings(database_url=f"sqlite:///{path}")) as server,
        httpx.Client(
            base_url=server.url, timeout=600, headers={"Accept-Encoding": "gzip"}
        ) as client,
    ):
        base = f"/api/v1/runs/{run_id}"
        zoom = {"start": args.steps // 2, "end": args.steps // 2 + args.steps // 100}
        for label, path_, params in (
            ("heatmap, whole run", f"{base}/heatmap", {"buckets": args.buckets}),
            ("heatmap, 1% zoom", f"{base}/heatmap", {"buckets": args.buckets, **zoom}),
            ("series global_norm", f"{base}/series", {"metric": "global_norm", "max_points": 2000}),
            ("layers", f"{base}/layers", {}),
        ):
            result = _timed_get(client, path_, params, args.repeats)
            sent, decoded = result["sent"] / 1024, result["decoded"] / 1024
            print(
                f"{label:22s} median {result['median_ms']:8.1f} ms  best {result['best_ms']:8.1f}"
                f" ms  sent {sent:8.1f} KiB  decoded {decoded:8.1f} KiB"
            )
        page = browse(f"{server.url}/runs/{run_id}")
    print(
        f"browser: first paint with data {page['chartsMs']:.0f} ms, heatmap ready "
        f"{page['heatmapMs']:.0f} ms (fetch {page['heatmapFetchMs']:.0f} ms, draw "
        f"{page['heatmapDrawMs']:.0f} ms), transferred {page['bytes'] / 1024:.0f} KiB "
        f"(API {page['apiBytes'] / 1024:.0f} KiB)"
    )


if __name__ == "__main__":
    main()
