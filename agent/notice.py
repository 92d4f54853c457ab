"""What a monitor tells its user: the run's start and end lines, and why nothing was recorded.

Lines go to stderr next to Keras' progress bar (``print``, so they show without any logging
set up); warnings go to the ``gradwatch.agent`` logger. Host-side, never blocks beyond the
write itself.
"""

from __future__ import annotations

import logging
import sys

from .sender import Sender

__all__ = ["say", "say_delivery", "warn_nothing_recorded"]

log = logging.getLogger("gradwatch.agent")


def say(line: str) -> None:
    """One status line for the user, on stderr, prefixed ``gradwatch:``."""
    print(f"gradwatch: {line}", file=sys.stderr, flush=True)


def say_delivery(run: str, url: str | None, sender: Sender) -> None:
    """At close, server mode: one line with the steps sent and the batches dropped and kept."""
    dropped = sum(sender.dropped_batches.values())
    line = (
        f"run {run!r}: {sender.sent_steps} steps sent, {dropped} batches dropped, "
        f"{sender.spooled_batches} batches spooled"
    )
    refused = sender.run_rejected
    if refused is not None:
        line += f"; the server refused the run ({refused})"
    elif sender.spool is not None and sender.spooled_batches:
        line += f" in {sender.spool.directory} (gradwatch upload sends them)"
    say(f"{line}; {url}")


def warn_nothing_recorded(run: str, batches: int, optimizers: list[str]) -> None:
    """A ``fit`` ran ``batches`` batches but no step reached a wrapped optimizer: why, and the fix.

    Args:
        run: The run's name.
        batches: Train batches the fit ran.
        optimizers: Names of the optimizers gradwatch wrapped.
    """
    wrapped = ", ".join(repr(name) for name in optimizers) or "none"
    log.warning(
        "gradwatch: fit() ran %d batches of run %r and recorded no step: the model's "
        "train_step never applied gradients through an optimizer gradwatch wrapped (%s). "
        "A train_step that applies an optimizer of its own (a GAN, a custom train_step) "
        "must apply a wrapped one: self.own_optimizer = monitor.wrap(own_optimizer), before "
        "fit. The server reports this run as no_data.",
        batches,
        run,
        wrapped,
    )
