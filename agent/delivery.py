"""Delivery wiring: the sender, its transport and its spool, built from a :class:`MonitorConfig`.

With a server: :class:`~gradwatch.agent.transport.HttpTransport` plus an
on-disk :class:`~gradwatch.agent.spool.Spool` (unless ``spool_max_bytes`` is
0). Without one (local mode): :class:`~gradwatch.agent.local.JsonlTransport`
and a :class:`~gradwatch.agent.local.SummaryPrinter`. Never imports TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, MonitorConfig, check_writable_directory
from .local import JsonlTransport, SummaryPrinter
from .records import OutgoingBatch
from .sender import Sender
from .spool import Spool
from .transport import HttpTransport, RetryPolicy, RunInfo, Transport

__all__ = ["Delivery", "build_delivery"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a monitor delivers its batches through.

    Attributes:
        sender: The background sender (thread-safe; see :class:`Sender`).
        printer: Local mode's end-of-training summary; ``None`` with a server
            or a custom transport.
    """

    sender: Sender
    printer: SummaryPrinter | None


def _check_token(token: str | None) -> str | None:
    """The token to send: the argument, else ``$GRADWATCH_TOKEN``; never logged.

    Raises:
        ConfigError: The token is not a non-empty string.
    """
    if token is None:
        token = os.environ.get("GRADWATCH_TOKEN") or None
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError("token: expected a non-empty string from `gradwatch token create`")
    return token


class _ChiefDelivers:
    """A non-chief worker's transport: the chief delivers the (identical) steps, so nothing
    is sent from here. Never blocks."""

    def create_run(self, run: RunInfo) -> None:
        pass

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        pass

    def set_status(self, run_id: str, status: str) -> None:
        pass

    def close(self) -> None:
        pass


def build_delivery(
    config: MonitorConfig,
    run_config: dict[str, Any],
    transport: Transport | None = None,
    token: str | None = None,
    *,
    delivers: bool = True,
) -> Delivery:
    """Build the sender for ``config``'s run and start its thread.

    Checks the directories it will write to first. Blocks only on creating
    those directories and scanning a leftover spool (local disk).

    Args:
        config: The monitor's settings.
        run_config: JSON-able settings sent with the run (policy, intervals).
        transport: A transport to use instead of the default one (tests).
        token: Bearer token with the ``ingest`` scope; default ``$GRADWATCH_TOKEN``.
        delivers: False on a multi-worker cluster's non-chief workers: their sender sends
            nothing and keeps no spool (the chief delivers the run).

    Raises:
        ConfigError: ``token`` is invalid, or ``local_dir``/``spool_dir``
            cannot be written to (the message names it).
    """
    spool = None
    printer = None
    if not delivers:
        transport = _ChiefDelivers()
    elif config.server is not None and config.spool_max_bytes > 0:
        check_writable_directory("spool_dir", config.spool_dir)
        spool = Spool(config.spool_dir, config.run_id, config.spool_max_bytes)
    if transport is None:
        if config.server is None:
            check_writable_directory("local_dir", config.local_dir)
            local = JsonlTransport(config.local_dir)
            printer = SummaryPrinter(local, config.run_id, config.run)
            transport = local
        else:
            transport = HttpTransport(
                config.server, config.request_timeout_seconds, token=_check_token(token)
            )
    run = RunInfo(run_id=config.run_id, name=config.run, project=config.project, config=run_config)
    sender = Sender(
        transport,
        run,
        queue_size=config.queue_size,
        retry=RetryPolicy(deadline_seconds=config.retry_deadline_seconds),
        spool=spool,
        queue_max_bytes=config.queue_max_bytes,
        exit_timeout_seconds=config.close_timeout_seconds,
    )
    return Delivery(sender, printer)
