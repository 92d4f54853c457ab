"""Validated, immutable agent configuration.

Every field is checked when a :class:`MonitorConfig` is constructed, so a bad
argument fails at ``GradientMonitor(...)`` with a message naming it, never
hours later inside the training loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .spool import default_spool_dir

__all__ = [
    "ConfigError",
    "MonitorClosedError",
    "MonitorConfig",
    "check_server_url",
    "check_writable_directory",
]

_PROJECT_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class ConfigError(ValueError):
    """A monitor argument is invalid; the message names the argument."""


class MonitorClosedError(RuntimeError):
    """A closed :class:`~gradwatch.agent.GradientMonitor` was used again."""


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """Settings of one :class:`~gradwatch.agent.GradientMonitor`.

    Attributes:
        run: Display name of the run (1..200 characters).
        server: Base URL of a gradwatch server (``http://host:port``), or
            ``None`` for local mode (JSON lines under ``local_dir``).
        project: Project the run belongs to (letters, digits, ``._-``).
        run_id: UUID of the run; generated when not given (on a multi-worker cluster,
            derived from the project, the run name and ``TF_CONFIG``'s addresses, so every
            worker names the same run: :func:`~gradwatch.agent.cluster.shared_run_id`).
            Pass the id of an earlier run to keep streaming into it after a restart.
        flush_every: Steps per host read and per batch sent (>= 1).
        stats_every: Steps between measurements of the per-layer weight norm
            and update ratio ‖Δw‖/‖w‖ (>= 0; 0 turns them off). 1 measures every
            step inside the train step (about ×1.05 in graph mode); larger values
            measure between steps and cost nothing on the other steps
            (:mod:`gradwatch.agent.weights`).
        queue_size: Batches held in memory while the sender is busy (>= 1).
        request_timeout_seconds: Timeout of one HTTP request, seconds (> 0).
        retry_deadline_seconds: How long the sender keeps retrying one request
            before it gives up on it, seconds (> 0).
        local_dir: Directory for local-mode run files.
        spool_dir: Root of the on-disk spool for batches the server has not
            acknowledged (each run gets a subdirectory); default
            ``<user cache dir>/gradwatch/spool``.
        spool_max_bytes: Cap on one run's spool, bytes (>= 0; 0 turns the
            spool off, so undeliverable batches are dropped). Over the cap the
            oldest batches are deleted and counted as ``spool_full``.
        queue_max_bytes: Cap on the batch arrays held in memory, bytes (>= 1);
            a batch that would exceed it is dropped as ``queue_full``.
        close_timeout_seconds: Default timeout of ``close()`` and of the close
            run at interpreter exit, seconds (> 0).
        max_incidents: Incident bundles written per run (>= 0; 0 turns capture off): the
            weights, optimizer state and batch of a step whose gradient was non-finite, that
            a policy skipped or (``incident_on_explosion``) that exploded, captured before its
            update (:mod:`gradwatch.agent.incident`).
        incident_on_explosion: Whether a critical explosion of a finite global norm (the
            server's default rule, judged in-graph) is an incident too (a bool).
        incident_max_bytes: Cap on the memory held for that capture, bytes (> 0); a model
            whose weights and optimizer state take more is not captured (said at build).
        incident_dir: Root of the bundles; default ``$GRADWATCH_INCIDENT_DIR``, else
            ``<local_dir>/incidents``.
        incident_snapshot_every: Under ``jit_compile``, the capture copies the state every
            this many steps (after their update) and keeps the batches since; the replay
            rolls forward from the copy to the bad step (1 to ``MAX_SNAPSHOT_EVERY``; 1: an
            exact copy before the bad step's update, which XLA makes cost a copy of the
            state on every step). Graph mode always copies at the bad step (free).
        recorder_steps: Recorded steps (norms, loss) kept in a bundle, up to the bad one
            (at most ``MAX_RECORDER_STEPS``); the learning rates, loss scales and positions
            of as many steps after it are announced to the server too.
    """

    run: str
    server: str | None = None
    project: str = "default"
    run_id: str = ""
    flush_every: int = 50
    stats_every: int = 50
    queue_size: int = 1000
    request_timeout_seconds: float = 10.0
    retry_deadline_seconds: float = 60.0
    local_dir: Path = Path("gradwatch-runs")
    spool_dir: Path = field(default_factory=default_spool_dir)
    spool_max_bytes: int = 256 * 2**20
    queue_max_bytes: int = 64 * 2**20
    close_timeout_seconds: float = 10.0
    max_incidents: int = 1
    incident_max_bytes: int = 2**30
    incident_dir: Path | None = None
    recorder_steps: int = 64
    incident_on_explosion: bool = True
    incident_snapshot_every: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or not 1 <= len(self.run) <= 200:
            raise ConfigError(f"run: expected a name of 1 to 200 characters, got {self.run!r}")
        if self.server is not None:
            object.__setattr__(self, "server", _check_url(self.server))
        if not isinstance(self.project, str) or not _PROJECT_RE.match(self.project):
            raise ConfigError(
                f"project: expected 1 to 100 letters, digits, '.', '_' or '-', got {self.project!r}"
            )
        if self.run_id:
            try:
                canonical = str(uuid.UUID(self.run_id))
            except (ValueError, TypeError, AttributeError):
                raise ConfigError(f"run_id: expected a UUID, got {self.run_id!r}") from None
            object.__setattr__(self, "run_id", canonical)
        else:
            object.__setattr__(self, "run_id", str(uuid.uuid4()))
        _check_positive_int("flush_every", self.flush_every)
        _check_int_or_off("stats_every", self.stats_every, "weight statistics")
        _check_positive_int("queue_size", self.queue_size)
        _check_positive_float("request_timeout_seconds", self.request_timeout_seconds)
        _check_positive_float("retry_deadline_seconds", self.retry_deadline_seconds)
        _check_positive_float("close_timeout_seconds", self.close_timeout_seconds)
        _check_int_or_off("spool_max_bytes", self.spool_max_bytes, "the spool")
        _check_positive_int("queue_max_bytes", self.queue_max_bytes)
        object.__setattr__(self, "local_dir", _to_path("local_dir", self.local_dir))
        object.__setattr__(self, "spool_dir", _to_path("spool_dir", self.spool_dir))
        _check_int_or_off("max_incidents", self.max_incidents, "incident capture")
        _check_positive_int("incident_max_bytes", self.incident_max_bytes)
        _check_positive_int("recorder_steps", self.recorder_steps)
        if self.recorder_steps > MAX_RECORDER_STEPS:
            raise ConfigError(
                f"recorder_steps: expected at most {MAX_RECORDER_STEPS} (a bundle's rows before "
                f"and after the bad step are announced to the server), got {self.recorder_steps}"
            )
        _check_positive_int("incident_snapshot_every", self.incident_snapshot_every)
        if self.incident_snapshot_every > MAX_SNAPSHOT_EVERY:
            raise ConfigError(
                f"incident_snapshot_every: expected at most {MAX_SNAPSHOT_EVERY} (the batches "
                f"since a copy are kept in memory), got {self.incident_snapshot_every}"
            )
        if not isinstance(self.incident_on_explosion, bool):
            raise ConfigError(
                f"incident_on_explosion: expected True or False, got {self.incident_on_explosion!r}"
            )
        incidents = self.incident_dir or os.environ.get("GRADWATCH_INCIDENT_DIR") or None
        if incidents is None:
            incidents = self.local_dir / "incidents"
        object.__setattr__(self, "incident_dir", _to_path("incident_dir", incidents))


def check_writable_directory(name: str, path: Path) -> Path:
    """Create ``path`` if needed and check that files can be written in it.

    Blocks on local disk I/O (creates and deletes one small file).

    Args:
        name: The argument the directory came from, for the message.
        path: The directory.

    Returns:
        ``path``.

    Raises:
        ConfigError: The directory cannot be created or written to (names ``name``).
    """
    probe = path / f".gradwatch-write-test-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"{name}: cannot write to the directory {str(path)!r}: {reason}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def check_server_url(url: object, name: str = "server") -> str:
    """Validate a server base URL and return it without a trailing slash.

    Raises:
        ConfigError: Not an ``http(s)://host[:port][/path]`` URL (names ``name``).
    """
    try:
        return _check_url(url)
    except ConfigError as exc:
        if name == "server":
            raise
        raise ConfigError(f"{name}:{str(exc).partition(':')[2]}") from None


def _to_path(name: str, value: object) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{name}: expected a directory path, got {value!r}")
    return Path(value)


MAX_RECORDER_STEPS = 2048
"""``recorder_steps``' bound: the rows before and after a bad step fit the server's 4,096."""

MAX_SNAPSHOT_EVERY = 1024
"""``incident_snapshot_every``'s bound: a replay rolls forward at most this many steps."""


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")


def _check_int_or_off(name: str, value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}: expected an integer >= 0 (0 turns {what} off), got {value!r}")


def _check_positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or value == float("inf")
    ):
        raise ConfigError(f"{name}: expected a finite number of seconds > 0, got {value!r}")


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"server: expected a URL like 'http://127.0.0.1:8000', got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"server: expected a URL like 'http://127.0.0.1:8000', got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"server: the port in {url!r} is not a number in 0..65535") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"server: expected a base URL without query or fragment, got {url!r}")
    if re.search(r"/api(/v\d+)?/?$", parts.path):
        base = url[: url.rindex("/api")]
        raise ConfigError(
            f"server: expected the server's base URL, without the API path: {base!r}, not {url!r}"
        )
    return url.rstrip("/")
