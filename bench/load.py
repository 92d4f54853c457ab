"""Load test: many agents streaming to 1, then 2, ``gradwatch server`` processes over one
PostgreSQL, with Prometheus scrapes and UI/REST reads beside them; a final audit; a profile.

For each process count (``--processes 1,2``), in a fresh database of a throwaway PostgreSQL
cluster on 127.0.0.1 (default durability; ``bench/ingest.py``'s helper):

* ``--runs`` runs of ``--layers`` layers, one thread each, behave as agents with the default
  ``flush_every=50``: a training step every ``--step-ms`` ms, so a batch of
  ``--steps-per-batch`` steps is due every 5 s (every step sent: no subsampling), gzip JSON
  built by the agent's own ``StepBatch.to_wire`` with weight statistics on one step per
  batch (``stats_every=50``). A thread sends its batches in order, each to a random process
  (a load balancer without affinity), waits for the reply, retries a failure, and sends a
  batch that is due at once when it is behind (an agent's queue). ``--resend-fraction`` of
  the batches are sent a second time, to a random process (a timed-out request's retry).
  Batches are built before the clock starts, so the clients cost little CPU.
* One thread scrapes ``/metrics`` of every process every ``--scrape-seconds`` (the scrape
  cache is the default 1 s, shorter than the interval, so every scrape is a real one).
* One thread reads like the web UI every ``--read-seconds``: the runs list, a run's
  ``/series``, ``/health``, ``/layers``, ``/events`` and ``/heatmap``, in turn.
* After ``--seconds`` the run threads stop (a batch due later is not sent) and the audit
  reads back, over REST from every process, each run's steps (every step sent stored exactly
  once), its totals and its detections, against the detectors run here on the same batches
  (every detection counted once, in ``/health`` and in ``/metrics`` of every process).

Printed per process count: offered and sustained samples/s, batches sent / due and how late
they went out, ingest latency (p50/p99 of the request as the agent sees it), scrape and read
latency (p50/p95), CPU used by the servers, PostgreSQL, the clients, py-spy and everything
else (cores), and the audit. With py-spy installed (``pip install py-spy``) each server
process is sampled for the whole window and the samples are filed by what the server was
doing (``bench/cpu.py``). Linux only; loopback only; every wait is bounded.

    python -m bench.load [--seconds 60] [--runs 100] [--layers 200] [--processes 1,2]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.cpu import (
    ActivitySampler,
    CpuMeter,
    CpuWindow,
    Sampler,
    find_postmaster,
    summarise_profile,
    tree_seconds,
)
from bench.ingest import postgres_databases
from bench.workload import Options, Workload
from gradwatch.wire.binary import MEDIA_TYPE
from tests.server_process import ServerProcess

_MEDIA_TYPES = {"binary": MEDIA_TYPE, "json": "application/json"}
_TIMEOUT = httpx.Timeout(60.0)
_RETRIES = 5


@dataclass
class _RunLog:
    """What one run's thread did."""

    stored_batches: int = 0
    stored_samples: int = 0
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    resends: int = 0
    resends_not_duplicate: int = 0


def _agent(
    index: int, run_id: str, urls: list[str], workload: Workload, t0: float, stop_at: float
) -> _RunLog:
    """One run's thread: send each batch when it is due (at once when behind), in order."""
    options = workload.options
    rng = random.Random(1_000_003 + index)
    offset = _offset(options, index)
    log = _RunLog()
    clients = [httpx.Client(base_url=url, timeout=_TIMEOUT) for url in urls]
    path = f"/api/v1/runs/{run_id}/batches"
    headers = {"Content-Type": _MEDIA_TYPES[options.body], "Content-Encoding": "gzip"}

    def post(body: bytes) -> httpx.Response | None:
        for _ in range(_RETRIES):
            client = clients[rng.randrange(len(clients))]
            started = time.perf_counter()
            try:
                response = client.post(path, content=body, headers=headers)
            except httpx.HTTPError as error:
                log.errors[type(error).__name__] += 1
                continue
            log.latencies.append(time.perf_counter() - started)
            if response.status_code == 200:
                return response
            log.errors[str(response.status_code)] += 1
        return None

    try:
        for batch, body in enumerate(workload.bodies[index]):
            due = t0 + offset + batch * options.batch_seconds
            if due >= stop_at:
                break
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            log.lateness.append(max(0.0, -pause))
            response = post(body)
            if response is None:
                break  # the audit then finds the run short of what it expects
            log.stored_batches += 1
            log.stored_samples += response.json()["stored_samples"]
            if rng.random() < options.resend_fraction:
                again = post(body)
                log.resends += 1
                log.resends_not_duplicate += again is None or not again.json()["duplicate"]
    finally:
        for client in clients:
            client.close()
    return log


def _poll(
    urls: list[str], interval: float, stop: threading.Event, paths: Callable[[int], list[str]]
) -> list[float]:
    """Request ``paths(i)`` on every process every ``interval`` seconds; return latencies."""
    times: list[float] = []
    clients = [httpx.Client(base_url=url, timeout=_TIMEOUT) for url in urls]
    try:
        i = 0
        while not stop.wait(interval):
            for client in clients:
                for path in paths(i):
                    started = time.perf_counter()
                    client.get(path).raise_for_status()
                    times.append(time.perf_counter() - started)
            i += 1
    finally:
        for client in clients:
            client.close()
    return times


def _ui_paths(run_ids: list[str]) -> Callable[[int], list[str]]:
    def paths(i: int) -> list[str]:
        run = f"/api/v1/runs/{run_ids[i % len(run_ids)]}"
        views = [
            f"{run}/series?metric=global_norm&max_points=2000",
            f"{run}/health",
            f"{run}/layers",
            f"{run}/events",
            f"{run}/heatmap?metric=grad_norm&buckets=500",
        ]
        return ["/api/v1/runs?limit=100", views[i % len(views)]]

    return paths


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else math.nan


@dataclass
class PhaseResult:
    processes: int
    offered: float
    sustained: float
    sent: int
    due: int
    late_p99_seconds: float
    ingest_ms: tuple[float, float]
    scrape_ms: tuple[float, float]
    read_ms: tuple[float, float]
    cpu: CpuWindow
    errors: Counter[str]
    audit: list[str]
    profile_files: list[Path]
    profile_rate: int
    profile_failures: list[str]
    activity: dict[str, float]


def _audit(
    urls: list[str], run_ids: list[str], logs: list[_RunLog], workload: Workload
) -> list[str]:
    """Problems found (empty: every step stored once, every detection counted once)."""
    problems: list[str] = []
    steps_per_batch = workload.options.steps_per_batch
    expected_total: Counter[tuple[str, str]] = Counter()
    with httpx.Client(timeout=_TIMEOUT) as client:
        for r, (run_id, log) in enumerate(zip(run_ids, logs, strict=True)):
            url = urls[r % len(urls)]
            steps = log.stored_batches * steps_per_batch
            run = client.get(f"{url}/api/v1/runs/{run_id}").json()
            stored: list[int] = []
            start = 0
            for _ in range(100):
                page = client.get(
                    f"{url}/api/v1/runs/{run_id}/series",
                    params={"metric": "global_norm", "raw": "true", "start": start,
                            "max_points": 10000},
                ).json()  # fmt: skip
                stored.extend(page["step"])
                if page["next_start"] is None:
                    break
                start = page["next_start"]
            if stored != list(range(steps)) or run["num_steps"] != steps:
                problems.append(f"run {r}: {len(stored)} steps read, {steps} acknowledged")
            expected = workload.expected[r % workload.variants][log.stored_batches]
            expected_total += expected
            health = client.get(f"{url}/api/v1/runs/{run_id}/health").json()["detections"]
            found = Counter(
                {(rule, sev): n for rule, by in health.items() for sev, n in by.items() if n}
            )
            if found != expected:
                problems.append(f"run {r}: detections {dict(found)} != {dict(expected)}")
        for url in urls:
            counted: Counter[tuple[str, str]] = Counter()
            for family in text_string_to_metric_families(client.get(f"{url}/metrics").text):
                for sample in family.samples:
                    if sample.name == "gradwatch_detector_events_total" and sample.value:
                        key = (sample.labels["rule"], sample.labels["severity"])
                        counted[key] += int(sample.value)
            if counted != expected_total:
                problems.append(f"{url}/metrics: {dict(counted)} != {dict(expected_total)}")
    resent_stored = sum(log.resends_not_duplicate for log in logs)
    if resent_stored:
        problems.append(f"{resent_stored} resends were not acknowledged as duplicates")
    return problems


def run_phase(
    processes: int, database_url: str, workload: Workload, workdir: Path, profile: bool
) -> PhaseResult:
    """Start the servers, stream, scrape and read for the window, audit, stop them."""
    options = workload.options
    env = {"GRADWATCH_RATE_LIMIT_PER_SECOND": "0"}
    command = (sys.executable, "-m", "gradwatch.server.cli")
    servers = [
        ServerProcess(
            workdir / f"p{processes}-{i}.db", command=command, env=env, database_url=database_url
        )
        for i in range(processes)
    ]
    port = urlsplit(database_url.replace("+psycopg", "")).port
    postmaster = find_postmaster(port) if port else None
    try:
        for server in servers:
            server.start()
        urls = [server.url for server in servers]
        run_ids = [str(uuid.uuid4()) for _ in range(options.runs)]
        with httpx.Client(timeout=_TIMEOUT) as client:
            for r, run_id in enumerate(run_ids):
                body = {"run_id": run_id, "name": f"load-{r}", "project": "load"}
                client.post(f"{urls[r % len(urls)]}/api/v1/runs", json=body).raise_for_status()
        pids = [server.process.pid for server in servers if server.process is not None]
        meter = CpuMeter(
            {
                "servers": lambda: sum(tree_seconds(pid) for pid in pids),
                "postgres": lambda: tree_seconds(postmaster) if postmaster else 0.0,
                "clients": time.process_time,  # this process: every client thread
                "py-spy": _reaped_children_seconds,
            }
        )
        sampler = Sampler(workdir)
        stop = threading.Event()
        logs: list[_RunLog] = [_RunLog() for _ in run_ids]
        t0 = time.monotonic() + 1.0
        stop_at = t0 + options.seconds

        def agent(r: int) -> None:
            logs[r] = _agent(r, run_ids[r], urls, workload, t0, stop_at)

        def scraper() -> None:
            scrapes.extend(_poll(urls, options.scrape_seconds, stop, lambda i: ["/metrics"]))

        def reader() -> None:
            reads.extend(_poll(urls, options.read_seconds, stop, _ui_paths(run_ids)))

        scrapes: list[float] = []
        reads: list[float] = []
        threads = [threading.Thread(target=agent, args=(r,)) for r in range(options.runs)]
        threads += [threading.Thread(target=scraper), threading.Thread(target=reader)]
        activity = ActivitySampler(database_url)
        activity.start()
        meter.start()
        if profile:
            sampler.start(pids, options.seconds + 1.0)
        for thread in threads:
            thread.start()
        for thread in threads[: options.runs]:
            thread.join(timeout=options.seconds + 600)
        finished = time.monotonic()
        stop.set()
        for thread in threads[options.runs :]:
            thread.join(timeout=120)
        sampler.wait(timeout=30)
        cpu = meter.stop()
        connections = activity.stop()
        elapsed = max(finished, stop_at) - t0
        sent = sum(log.stored_batches for log in logs)
        due = sum(min(options.batches_per_run, _due(options, r)) for r in range(options.runs))
        audit = _audit(urls, run_ids, logs, workload)
        latencies = [x for log in logs for x in log.latencies]
        lateness = [x for log in logs for x in log.lateness]
        return PhaseResult(
            processes=processes,
            offered=due * options.samples_per_batch / options.seconds,
            sustained=sum(log.stored_samples for log in logs) / elapsed,
            sent=sent,
            due=due,
            late_p99_seconds=_percentile(lateness, 99) / 1000,
            ingest_ms=(_percentile(latencies, 50), _percentile(latencies, 99)),
            scrape_ms=(_percentile(scrapes, 50), _percentile(scrapes, 95)),
            read_ms=(_percentile(reads, 50), _percentile(reads, 95)),
            cpu=cpu,
            errors=sum((log.errors for log in logs), Counter()),
            audit=audit,
            profile_files=sampler.files,
            profile_rate=sampler.rate,
            profile_failures=sampler.failures(),
            activity=connections,
        )
    finally:
        for server in servers:
            server.stop()


def _offset(options: Options, run: int) -> float:
    """When a run's first batch is due after the window opens, in seconds (runs spread)."""
    return random.Random(run).random() * options.batch_seconds


def _due(options: Options, run: int) -> int:
    """Batches of a run due within the window."""
    return max(0, math.ceil((options.seconds - _offset(options, run)) / options.batch_seconds))


def _reaped_children_seconds() -> float:
    """CPU seconds of this process's children that exited (py-spy, once it has finished)."""
    times = os.times()
    return times.children_user + times.children_system


def _report(results: list[PhaseResult], *, profiles: bool) -> None:
    print(
        f"\n{'processes':>9} {'offered/s':>10} {'stored/s':>10} {'batches':>11} "
        f"{'late p99':>8} {'ingest ms p50/p99':>18} {'scrape ms p50/p95':>18} "
        f"{'reads ms p50/p95':>17}  cores: servers / postgres / clients / py-spy / other"
    )
    for res in results:
        g = res.cpu.groups
        print(
            f"{res.processes:>9} {res.offered:>10,.0f} {res.sustained:>10,.0f} "
            f"{res.sent:>5}/{res.due:<5} {res.late_p99_seconds:>7.1f}s "
            f"{res.ingest_ms[0]:>8.1f} / {res.ingest_ms[1]:<7.1f} "
            f"{res.scrape_ms[0]:>8.1f} / {res.scrape_ms[1]:<7.1f} "
            f"{res.read_ms[0]:>7.1f} / {res.read_ms[1]:<7.1f}  "
            f"{g['servers']:.2f} / {g['postgres']:.2f} / {g['clients']:.2f} / "
            f"{g['py-spy']:.2f} / {res.cpu.other:.2f} of {res.cpu.machine_cores:.1f}"
        )
    for res in results:
        seconds = res.cpu.wall_seconds / max(res.sent, 1)
        per_batch = {k: 1000 * cores * seconds for k, cores in res.cpu.groups.items()}
        verdict = "OK" if not res.audit else "FAILED"
        print(
            f"\n{res.processes} process(es): CPU per batch stored: servers "
            f"{per_batch['servers']:.1f} ms, PostgreSQL {per_batch['postgres']:.1f} ms; "
            "PostgreSQL connections (mean): "
            + (", ".join(f"{n:.2f} {state}" for state, n in res.activity.items()) or "none")
        )
        print(f"audit: {verdict}; request errors {dict(res.errors)}")
        for problem in res.audit[:20]:
            print(f"  {problem}")
    if len(results) > 1 and results[0].sustained:
        ratio = results[-1].sustained / results[0].sustained
        print(f"\nscaling {results[0].processes} → {results[-1].processes} processes: ×{ratio:.2f}")
    for res in results if profiles else []:
        for failure in res.profile_failures:
            print(f"\nprofile, {res.processes} process(es): py-spy failed: {failure}")
        if not res.profile_files:
            continue
        summary = summarise_profile(res.profile_files)
        if not summary.samples:
            continue
        held = summary.samples / (res.profile_rate * res.cpu.wall_seconds * res.processes)
        print(
            f"\nprofile, {res.processes} process(es): {summary.samples} samples of the thread "
            f"holding the GIL ({res.profile_rate} Hz; GIL held {100 * held:.0f} % of the window "
            "per process)"
        )
        for name, count in summary.categories:
            print(f"  {100 * count / summary.samples:5.1f} %  {name}")
        print("  innermost frames:")
        for name, count in summary.own:
            print(f"  {100 * count / summary.samples:5.1f} %  {name}")
        print("  gradwatch functions on the stack:")
        for name, count in summary.inclusive:
            print(f"  {100 * count / summary.samples:5.1f} %  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each window")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--steps-per-batch", type=int, default=50, help="the agent's flush_every")
    parser.add_argument("--step-ms", type=float, default=100.0, help="training step time")
    parser.add_argument("--processes", default="1,2", help="server process counts, in turn")
    parser.add_argument("--scrape-seconds", type=float, default=5.0)
    parser.add_argument("--read-seconds", type=float, default=1.0)
    parser.add_argument("--resend-fraction", type=float, default=0.02)
    parser.add_argument("--postgres-url", default=None, help="use this server, not a new one")
    parser.add_argument("--no-profile", action="store_true", help="do not run py-spy")
    parser.add_argument(
        "--body",
        choices=("binary", "json"),
        default="binary",
        help="the batches' body: binary (what the agent sends) or json (the figures in README "
        "were measured with json, before the agent sent binary)",
    )
    args = parser.parse_args()
    if not 1 <= args.runs <= 1000 or not 1 <= args.layers <= 10_000 or args.seconds > 3600:
        parser.error("--runs 1..1000, --layers 1..10000, --seconds ≤ 3600")
    options = Options(
        runs=args.runs,
        layers=args.layers,
        steps_per_batch=args.steps_per_batch,
        step_seconds=args.step_ms / 1000,
        seconds=args.seconds,
        scrape_seconds=args.scrape_seconds,
        read_seconds=args.read_seconds,
        resend_fraction=args.resend_fraction,
        body=args.body,
    )
    profile = not args.no_profile and Sampler.available() is not None
    if not args.no_profile and not profile:
        print("py-spy not found (pip install py-spy): no profile")
    started = time.perf_counter()
    workload = Workload(options)
    kib = statistics.mean(len(b) for bodies in workload.bodies for b in bodies) / 1024
    print(
        f"{options.runs} runs × {options.layers} layers, a batch of {options.steps_per_batch} "
        f"steps every {options.batch_seconds:g} s per run ({options.samples_per_batch:,} "
        f"samples, {kib:.0f} KiB gzip {options.body}), {options.seconds:g} s per window; built in "
        f"{time.perf_counter() - started:.1f} s"
    )
    results = []
    with (
        postgres_databases(args.postgres_url) as make_database,
        tempfile.TemporaryDirectory(prefix="gradwatch-load-") as workdir,
    ):
        if make_database is None:
            sys.exit("PostgreSQL binaries not found: apt-get install postgresql")
        for processes in (int(p) for p in args.processes.split(",")):
            results.append(run_phase(processes, make_database(), workload, Path(workdir), profile))
            _report(results[-1:], profiles=False)
        print("\n== summary ==")
        _report(results, profiles=True)


if __name__ == "__main__":
    main()
