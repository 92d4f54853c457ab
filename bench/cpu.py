"""Where the CPU goes during a load test: per-process CPU time from ``/proc`` and sampling
profiles of server processes with py-spy (for ``bench/load.py``; Linux only).

* :func:`process_seconds` and :class:`CpuMeter`: user + system CPU seconds of process groups
  (the servers, the PostgreSQL cluster, this client process) and of the whole machine, so a
  window's figures say how many of the machine's cores each used.
* :class:`Sampler`: ``py-spy record --gil --nonblocking --format raw`` attached to running
  processes (``pip install py-spy``), and :func:`summarise_profile`, which files every
  sample under the innermost frame that says what the process was doing (JSON parsing, the
  database driver, the detectors, …) and lists the hottest functions.
* :class:`ActivitySampler`: what the database's connections are doing (``pg_stat_activity``):
  running a statement, waiting (for a lock, for I/O, …), or waiting inside a transaction for
  the server process to send the next statement.

Call these from the thread that drives the benchmark (``ActivitySampler`` polls on a thread
of its own). Reading ``/proc`` never blocks; :meth:`Sampler.wait` and
:meth:`ActivitySampler.stop` block until py-spy or the polling thread has finished.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "CATEGORIES",
    "ActivitySampler",
    "CpuMeter",
    "ProfileSummary",
    "Sampler",
    "child_pids",
    "find_postmaster",
    "process_seconds",
    "summarise_profile",
]

_TICKS = os.sysconf("SC_CLK_TCK")

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("database driver (psycopg, libpq)", ("psycopg/", "psycopg_")),
    ("SQLAlchemy (ORM, statements)", ("sqlalchemy/",)),
    ("gzip decoding", ("gzip.py", "zlib")),
    ("JSON parsing", ("json/", "server/api/body.py")),
    ("validation (pydantic)", ("pydantic/", "pydantic_core/")),
    ("detectors", ("server/detect/",)),
    ("ingest: blocks, summaries, rollups", ("server/ingest/", "server/store/")),
    ("/metrics exposition", ("prometheus_client/", "server/export/")),
    ("REST queries", ("server/query/",)),
    ("HTTP and ASGI (uvicorn, starlette, fastapi)", ("uvicorn/", "starlette/", "fastapi/")),
    (
        "event loop (uvloop, httptools: C) and thread hand-off",
        ("anyio/", "asyncio/", "threading.py", "concurrent/"),
    ),
)
"""Sample categories: the first frame from the innermost outwards whose file matches one of a
category's substrings decides (NumPy inside the detectors counts as detectors)."""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds of a process (0 when it is gone); with ``reaped_children``
    also those of its children that exited and were waited for."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _TICKS


def child_pids(pid: int) -> list[int]:
    """Live children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def find_postmaster(port: int) -> int | None:
    """The PostgreSQL server process listening on ``port`` (started with ``-p PORT``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and b"-p" in argv:
            at = argv.index(b"-p")
            if at + 1 < len(argv) and argv[at + 1] == str(port).encode():
                return int(entry.name)
    return None


def tree_seconds(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live children (one level)."""
    return process_seconds(pid, reaped_children=True) + sum(
        process_seconds(child) for child in child_pids(pid)
    )


def _machine() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    total = sum(values[:8])  # user … steal (guest time is already in user)
    return (total - idle) / _TICKS, total / _TICKS


@dataclass(frozen=True, slots=True)
class CpuWindow:
    """CPU used during a window, in cores (CPU seconds per wall second)."""

    wall_seconds: float
    groups: dict[str, float]
    machine_busy: float
    machine_cores: float

    @property
    def other(self) -> float:
        """Cores used by processes outside every group (other work on the machine)."""
        return max(0.0, self.machine_busy - sum(self.groups.values()))


class CpuMeter:
    """CPU seconds of named process groups between :meth:`start` and :meth:`stop`.

    Args:
        groups: Name → function returning the group's CPU seconds so far.
    """

    def __init__(self, groups: dict[str, Callable[[], float]]) -> None:
        self._groups = groups
        self._start: tuple[float, dict[str, float], tuple[float, float]] | None = None

    def _read(self) -> tuple[float, dict[str, float], tuple[float, float]]:
        return time.monotonic(), {k: f() for k, f in self._groups.items()}, _machine()

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> CpuWindow:
        assert self._start is not None, "start() first"
        (t0, g0, m0), (t1, g1, m1) = self._start, self._read()
        wall = t1 - t0
        return CpuWindow(
            wall_seconds=wall,
            groups={k: (g1[k] - g0[k]) / wall for k in g0},
            machine_busy=(m1[0] - m0[0]) / wall,
            machine_cores=(m1[1] - m0[1]) / wall,
        )


class Sampler:
    """py-spy attached to processes for a fixed time, writing raw (collapsed) stacks.

    Only the thread holding the GIL is sampled (``--gil``): the Python CPU work of the
    process, which is what one process cannot spread over more cores. A thread waiting for
    PostgreSQL or for the GIL is not in the profile, so ``samples / (rate × seconds)`` is the
    fraction of the window the process held its GIL.

    Args:
        directory: Where the profiles go (one file per process).
        rate: Samples per second per process.
    """

    def __init__(self, directory: Path, rate: int = 20) -> None:
        self.directory = directory
        self.rate = rate
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.files: list[Path] = []

    @staticmethod
    def available() -> str | None:
        """The py-spy executable, or None (``pip install py-spy``)."""
        return shutil.which("py-spy")

    def start(self, pids: Iterable[int], seconds: float) -> None:
        """Start sampling each process for ``seconds`` (non-blocking: py-spy never pauses
        the target, so it costs the servers almost nothing; it uses CPU of its own)."""
        exe = self.available()
        assert exe is not None, "py-spy not installed"
        for pid in pids:
            out = self.directory / f"py-spy-{pid}.txt"
            self.files.append(out)
            log = (self.directory / f"py-spy-{pid}.log").open("wb")
            self._logs.append(log)
            self._procs.append(
                subprocess.Popen(
                    [
                        *(exe, "record", "--pid", str(pid)),
                        *("--duration", str(max(1, round(seconds))), "--rate", str(self.rate)),
                        *("--gil", "--nonblocking", "--format", "raw", "-o", str(out)),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait(self, timeout: float) -> None:
        """Wait for every py-spy to finish (killed after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()

    def failures(self) -> list[str]:
        """The last line py-spy wrote for each process it could not profile."""
        return [
            f"{path.name}: {path.with_suffix('.log').read_text(errors='replace').strip()[-300:]}"
            for path in self.files
            if not path.exists()
        ]


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """Samples of one or more profiles, by category and by function."""

    samples: int
    categories: list[tuple[str, int]]
    own: list[tuple[str, int]]
    """Functions by samples in which they were the innermost frame."""
    inclusive: list[tuple[str, int]]
    """gradwatch functions by samples in which they were anywhere on the stack."""


def _read_stacks(files: Sequence[Path]) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _category(stack: tuple[str, ...]) -> str:
    for frame in reversed(stack):
        for name, patterns in CATEGORIES:
            if any(pattern in frame for pattern in patterns):
                return name
    return "other"


def _short(frame: str) -> str:
    """``func (path:line)`` → ``func (path)``, the path from its package on."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        path = path.split(marker)[-1]
    return f"{name} ({path})"


def summarise_profile(files: Sequence[Path], top: int = 15) -> ProfileSummary:
    """Categories and hottest functions of raw py-spy profiles."""
    stacks = _read_stacks(files)
    categories: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        categories[_category(stack)] += count
        own[_short(stack[-1])] += count
        for frame in {_short(f) for f in stack if "server/" in f and "uvicorn" not in f}:
            inclusive[frame] += count
    return ProfileSummary(
        samples=sum(stacks.values()),
        categories=categories.most_common(),
        own=own.most_common(top),
        inclusive=inclusive.most_common(top),
    )


_ACTIVITY_SQL = """
SELECT CASE
         WHEN wait_event_type = 'Client' THEN 'waiting for the server process (in a transaction)'
         WHEN wait_event_type IS NULL THEN 'running a statement'
         ELSE 'waiting for ' || wait_event_type || ':' || wait_event
       END,
       count(*)
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND pid <> pg_backend_pid() AND state <> 'idle'
GROUP BY 1
"""
"""Busy connections by what they do; a wait names PostgreSQL's wait event (``Lock:tuple``
a row lock, ``LWLock:WALWrite`` a commit waiting for another's WAL flush, ``IO:…`` disk)."""


class ActivitySampler:
    """Mean number of a PostgreSQL database's connections in each state over a window
    (``pg_stat_activity`` every ``interval`` seconds; idle pooled connections not counted).

    Args:
        url: SQLAlchemy URL of the database (``postgresql+psycopg://…``).
        interval: Seconds between two samples.
    """

    def __init__(self, url: str, interval: float = 0.25) -> None:
        self._conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._interval = interval
        self._stop = threading.Event()
        self._counts: Counter[str] = Counter()
        self._polls = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self._conninfo, autocommit=True) as connection:
            while not self._stop.wait(self._interval):
                for state, count in connection.execute(_ACTIVITY_SQL):
                    self._counts[state] += count
                self._polls += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Stop polling; the mean connections per state, busiest first."""
        self._stop.set()
        self._thread.join(timeout=30)
        polls = max(1, self._polls)
        return {state: n / polls for state, n in self._counts.most_common()}
