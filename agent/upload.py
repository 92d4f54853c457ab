"""``gradwatch upload``: send local run files and leftover spools to a server.

The command's logic (the CLI in :mod:`gradwatch.server.cli` only parses arguments and
prints): find the runs under a path, create each run, send its batches in step order
with retries, and set its last recorded status. Idempotent: the server stores a batch
it already has as a duplicate. Never imports TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .local import read_run_file
from .spool import Spool, is_spool_directory
from .transport import (
    HttpTransport,
    RejectedError,
    RetryableError,
    RetryPolicy,
    RunInfo,
    call_with_retry,
)

__all__ = ["UploadResult", "upload"]

log = logging.getLogger("gradwatch.agent")


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What ``upload`` did with one run.

    Attributes:
        source: The local run file or spool directory.
        run_id: The run.
        name: The run's display name.
        batches: Batches found.
        stored: Batches the server stored now.
        duplicates: Batches the server already had (nothing stored).
        failed: Batches rejected, unreadable or not delivered before the deadline.
        status: The run status sent, if any.
    """

    source: Path
    run_id: str
    name: str
    batches: int
    stored: int
    duplicates: int
    failed: int
    status: str | None

    @property
    def ok(self) -> bool:
        """Whether every batch is now on the server."""
        return self.failed == 0


@dataclass(frozen=True, slots=True)
class _Source:
    path: Path
    run: RunInfo
    batches: Callable[[], Iterable[dict[str, Any] | None]]
    count: int
    status: str | None
    dropped_batches: Mapping[str, int]


def upload(
    path: Path,
    transport: HttpTransport,
    retry: RetryPolicy | None = None,
    on_result: Callable[[UploadResult], None] | None = None,
) -> list[UploadResult]:
    """Send local run files or leftover spools to a server, idempotently.

    ``path`` may be a local-mode run file (``<run_id>.jsonl``), a run's spool
    directory, or a directory holding either (a local-mode directory, the
    spool root). Each run is created (idempotent), its batches are sent in
    step order (a batch the server already has stores nothing) and its last
    recorded status is set. Transient failures are retried by ``retry``.
    Files are only read, never deleted.

    Blocks on the network; not thread-safe (one transport).

    Args:
        path: What to upload.
        transport: Connection to the server.
        retry: Retry policy for 5xx, 429 and connection errors.
        on_result: Called after each run (for progress output).

    Returns:
        One result per run found.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds nothing to upload.
    """
    sources = _find_sources(Path(path))
    policy = retry or RetryPolicy()
    results = []
    for source in sources:
        result = _upload_one(source, transport, policy)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _upload_one(source: _Source, transport: HttpTransport, policy: RetryPolicy) -> UploadResult:
    run_id = source.run.run_id
    stored = duplicates = failed = 0
    try:
        call_with_retry(lambda: transport.create_run(source.run), policy)
    except (RejectedError, RetryableError) as exc:
        log.error("gradwatch: could not create run %s: %s", run_id, exc)
        return UploadResult(
            source.path, run_id, source.run.name, source.count, 0, 0, source.count, None
        )
    for wire in source.batches():
        if wire is None:
            failed += 1
            continue
        ack = _post(transport, run_id, wire, source.dropped_batches, policy)
        if ack is None:
            failed += 1
        elif ack.get("duplicate"):
            duplicates += 1
        else:
            stored += 1
    status = _set_status(transport, run_id, source.status, policy)
    return UploadResult(
        source.path, run_id, source.run.name, source.count, stored, duplicates, failed, status
    )


def _set_status(
    transport: HttpTransport, run_id: str, status: str | None, policy: RetryPolicy
) -> str | None:
    """Set the run's status with retries; the status set, or ``None``."""
    if status is None:
        return None
    try:
        call_with_retry(lambda: transport.set_status(run_id, status), policy)
    except (RejectedError, RetryableError) as exc:
        log.error("gradwatch: status of run %s not set: %s", run_id, exc)
        return None
    return status


def _post(
    transport: HttpTransport,
    run_id: str,
    wire: dict[str, Any],
    dropped_batches: Mapping[str, int],
    policy: RetryPolicy,
) -> dict[str, Any] | None:
    """Send one batch with retries; its acknowledgement, or ``None`` if it failed."""
    body = {**wire, "dropped_batches": dict(dropped_batches)} if dropped_batches else wire
    try:
        return call_with_retry(lambda: transport.post_batch(run_id, body), policy)
    except (RejectedError, RetryableError) as exc:
        log.error(
            "gradwatch: batch %s of run %s not uploaded: %s", wire.get("batch_id"), run_id, exc
        )
        return None


def _find_sources(path: Path) -> list[_Source]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return [_file_source(path)]
    if is_spool_directory(path):
        return [_spool_source(path)]
    sources = [_file_source(p) for p in sorted(path.glob("*.jsonl"))]
    sources += [_spool_source(p) for p in sorted(path.iterdir()) if is_spool_directory(p)]
    if not sources:
        raise FileNotFoundError(f"{path}: no local run file (*.jsonl) or spool directory in it")
    return sources


def _file_source(path: Path) -> _Source:
    record = read_run_file(path)
    ordered = sorted(record.batches, key=_first_step)
    batches: list[dict[str, Any] | None] = list(ordered)
    return _Source(
        path=path,
        run=record.run,
        batches=lambda: batches,
        count=len(batches) + record.unreadable_lines,
        status=record.status,
        dropped_batches={},
    )


def _first_step(wire: dict[str, Any]) -> int:
    return int(wire["step"][0])


def _spool_source(path: Path) -> _Source:
    spool = Spool(path.parent, path.name, max_bytes=2**63 - 1)
    state = spool.load_state()
    if state is None:
        raise FileNotFoundError(f"{path}: spool directory without a readable state file")

    def batches() -> Iterator[dict[str, Any] | None]:
        for entry in spool.entries():
            yield spool.read(entry)

    return _Source(
        path=path,
        run=state.run,
        batches=batches,
        count=len(spool),
        status=state.status,
        dropped_batches=state.dropped_batches,
    )
