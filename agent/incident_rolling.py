"""Rolling capture under XLA: a copy of the state every ``K`` steps and the batches since.

An exact copy of the state just before a bad step's update costs, under ``jit_compile``, a
copy of the weights and optimizer state on *every* step, taken or not: XLA updates the
variables in place, and a ``tf.cond`` that may read their pre-update values keeps them alive
across the update (measured on an MLP step: ×1.13 best, ×1.17 median). A copy *after* the
update does not interfere, so under XLA the capture

* copies the state (weights, optimizer variables, the model's RNG states and other
  non-trainable variables) after the update of every step ``s`` with ``(s + 1) % K == 0``
  (a :class:`~gradwatch.agent.copy_branch.CopyBranch` taken once every ``K`` steps: a plain
  ``tf.cond`` that only copies, XLA compiles into a copy on every step): the state step
  ``s + 1`` begins with; and
  once, eagerly, when the first step is traced (the state the first step begins with);
* copies each step's batch into slot ``step % K`` of a ring (a ``K``-slot buffer, updated in
  place), while armed;
* on a bad step only flags it (scalar assigns).

The bundle then holds the copy, the batches from the copy's step up to the bad one and the
RNG states the copy's step began with; ``gradwatch replay`` runs the steps in between again
(under XLA, as trained) and compares their global norms with the recorded ones before it
replays the bad step. Cost: the copy ÷ ``K`` plus one batch copy per step; memory: one copy
of the state and ``K`` batches.

Used only where the replay can run the steps in between as training did: ``fit`` under XLA
on one replica, without groups or gradient accumulation (a clip policy's state is copied
with the rest), and when the ring fits ``incident_max_bytes``; everywhere else the exact
copy (:mod:`.incident`).

Variables are made eagerly (``tf.init_scope``). Not thread-safe: the training thread owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from .bundle import describe
from .clip.base import state_variable
from .copy_branch import CopyBranch
from .incident_batch import BatchCopy
from .notice import say

__all__ = ["EarlierBatches", "RollingSnapshot", "bundle_parts", "earlier_batches", "rolls"]


class RollingSnapshot:
    """When the last copy of the state was taken (the step it begins), every ``every`` steps.

    Args:
        every: ``K``, steps between copies (> 1).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.begins: tf.Variable | None = None
        self._branch = CopyBranch("incident_snapshots")

    def build(self, first_step: int, copy: Callable[[], None]) -> None:
        """Eagerly (at the first trace, before any step of it ran): copy the state now, the
        state step ``first_step`` begins with."""
        with tf.init_scope():
            self.begins = state_variable(first_step, tf.int64, "incident_snapshot_step")
            self._branch.build()
            copy()

    def after_update(self, step: Any, armed: Any, copy: Callable[[], None]) -> None:
        """In-graph, after step ``step``'s update: copy the state every ``every`` steps while
        armed (once disarmed by a bad step, the copy before it is kept)."""
        begins = self.begins
        assert begins is not None
        following = tf.cast(step, tf.int64) + 1
        due = tf.logical_and(armed, tf.equal(following % self.every, 0))

        def take() -> None:
            copy()
            begins.assign(following)

        self._branch(due, take)


@dataclass(frozen=True, slots=True)
class EarlierBatches:
    """Host: what a rolling bundle holds to roll forward from its copy to the bad step.

    Attributes:
        begins: The step the copy of the state begins with.
        slots: The ring slots of steps ``begins`` to the bad step - 1, in order.
        missing: Steps in that range whose batch the ring does not hold (a larger batch than
            the first traced one, or a re-armed capture whose ring restarted).
    """

    begins: int
    slots: list[int]
    missing: list[int]


def earlier_batches(snapshot: RollingSnapshot, batch: BatchCopy, step: int) -> EarlierBatches:
    """Host: the ring slots of the steps between the copy and ``step`` (small reads)."""
    assert snapshot.begins is not None
    begins = int(snapshot.begins.numpy())
    steps = range(begins, step)
    found = batch.slots_of(steps)
    slots = [slot for slot in found if slot is not None]
    missing = [earlier for earlier, slot in zip(steps, found, strict=True) if slot is None]
    return EarlierBatches(begins, slots, missing)


def rolls(
    *, every: int, batch_bytes: int | None, state_bytes: int, max_bytes: int, possible: bool
) -> bool:
    """At the first trace: whether the capture rolls. ``possible``: XLA in ``fit`` on one
    replica, without groups or accumulation; ``batch_bytes``: ``fit``'s batch (``None``:
    not seen, a custom loop). Says once why not when only the byte cap stands in the way."""
    if not possible or every <= 1 or batch_bytes is None:
        return False
    if state_bytes + every * batch_bytes <= max_bytes:
        return True
    say(
        f"incident capture under XLA copies the state before every step (slower): {every} "
        f"batches of {batch_bytes / 2**20:.1f} MiB and the state would exceed "
        f"incident_max_bytes={max_bytes:,}; raise it or lower incident_snapshot_every"
    )
    return False


@dataclass(frozen=True, slots=True)
class BundleParts:
    """Host: a rolling bundle's parts (see :func:`bundle_parts`).

    Attributes:
        slot: The ring slot of the bad step's batch, or ``None``.
        checkpoint: Its extra checkpoint attributes (``policy_state``, ``earlier``).
        manifest: Its manifest's ``roll_forward``.
        earlier: The steps back to the copy.
    """

    slot: int | None
    checkpoint: dict[str, Any]
    manifest: dict[str, Any]
    earlier: EarlierBatches


def bundle_parts(
    snapshot: RollingSnapshot,
    batch: BatchCopy,
    step: int,
    policy_state: Sequence[Any],
    policy_copies: Sequence[Any],
) -> BundleParts:
    """Host: what a rolling bundle of ``step`` holds beyond an exact one: the copied clip
    policy state (``policy_copies``, of ``policy_state``) and the batches since the copy
    (eager copies of one batch each)."""
    earlier = earlier_batches(snapshot, batch, step)
    return BundleParts(
        slot=batch.slots_of([step])[0],
        checkpoint={
            "policy_state": list(policy_copies),
            "earlier": [
                tf.train.Checkpoint(batch=leaves, batch_shape=shapes)
                for leaves, shapes in (batch.slot(s) for s in earlier.slots)
            ],
        },
        manifest={
            "from_step": earlier.begins,
            "steps": len(earlier.slots),
            "every": snapshot.every,
            "missing": earlier.missing,
            "policy_state": [describe(v) for v in policy_state],
        },
        earlier=earlier,
    )
