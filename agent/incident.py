"""Incident capture: the state just before the first bad step, kept so the step can be replayed.

A step is bad when its gradient holds a NaN/±Inf or a skip policy skipped it. In-graph, between
the clip policy and the inner optimizer's update (:meth:`IncidentCapture.before_update`), a
``tf.cond`` that is false on every healthy step copies the trainable weights and the optimizer's
variables into shadow variables made at build time; at the end of the train step
(:meth:`IncidentCapture.capture_batch`) the batch is copied the same way into flat buffers (XLA
cannot change a variable's shape, so each input keeps a buffer of the first traced batch's size
plus its shape). On the host, the next ring read (:meth:`IncidentCapture.write_if_pending`, one
scalar read) writes the bundle:

    <incident_dir>/<run_id>/step-<N>/manifest.json   what and where (format below)
    <incident_dir>/<run_id>/step-<N>/state.*         tf.train.Checkpoint: weights/i,
                                                     optimizer/i, batch/i, batch_shape/i

Under ``jit_compile`` (in ``fit``, on one replica, without groups or gradient accumulation)
the capture rolls instead (:mod:`gradwatch.agent.incident_rolling`): a copy of the state every
``incident_snapshot_every`` steps and the batches since, which the replay runs forward; an
exact copy would cost a copy of the state on every step there.

Cost: one scalar predicate per step; memory: one copy of the weights, the optimizer state and
one batch (rolling: ``incident_snapshot_every`` batches), held from the first build
(``incident_max_bytes`` caps it; over it capture is off and the monitor says so once; a
rolling ring over it falls back to the exact copy). With gradient accumulation
the update step is captured: its last micro-batch and the optimizer's accumulators (the
earlier micro-batches' gradient sum). Under ``tf.distribute``
with several replicas the shadows are mirrored, the copy is made in cross-replica context
and the batch is the global one, gathered from every replica, on every worker
(:mod:`gradwatch.agent.incident_batch`); only the chief writes the bundle, and every
worker re-arms at the same step so their in-graph decisions stay the same. Writing blocks the
training thread once, for the checkpoint write.

Not thread-safe: the training thread owns it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import _keras_compat as compat
from .bundle import (
    BUNDLE_FORMAT,
    ROLLING_FORMAT,
    announcement,
    bundle_path,
    describe,
    learning_rate,
    model_description,
    recorded_columns,
    recorded_rows,
)
from .clip.base import state_variable
from .cluster import cluster_task
from .copy_branch import CopyBranch
from .incident_batch import BatchCopy, many_replicas
from .incident_rolling import RollingSnapshot, bundle_parts, rolls
from .incident_state import SharedCapture
from .incident_trigger import ExplosionWatch
from .notice import say
from .records import StepBatch

__all__ = ["IncidentCapture", "IncidentSettings", "SharedCapture"]

log = logging.getLogger("gradwatch.agent")


_CAUSES = ("nonfinite", "skipped", "explosion")
_SAID = {
    "nonfinite": "had a non-finite gradient",
    "skipped": "was skipped by the policy",
    "explosion": "had an exploding gradient",
}


@dataclass(frozen=True, slots=True)
class IncidentSettings:
    """What the capture may keep and where it writes (from ``MonitorConfig``).

    Attributes:
        directory: Root of the bundles (one subdirectory per run).
        max_incidents: Bundles per run (0 turns capture off).
        max_bytes: Cap on the memory held for one capture (weights, optimizer state, batch).
        recorder_steps: Recorded steps kept in the bundle, up to and including the bad one.
        run_id: The run's id; ``run``: its name; ``policy``: the policy's description.
        group: The optimizer group whose steps this capture watches, or ``None``.
        explosion: Whether a critical explosion of a finite global norm is captured too.
        snapshot_every: Under XLA, steps between the rolling capture's copies (1: exact copy).
    """

    directory: Path
    max_incidents: int
    max_bytes: int
    recorder_steps: int
    run_id: str
    run: str
    policy: dict[str, Any] | None
    group: str | None = None
    explosion: bool = True
    snapshot_every: int = 1


class IncidentCapture:
    """Shadow copies of the weights, one optimizer's variables and a batch, filled on the
    first bad step (of the run: a group's capture shares its :class:`SharedCapture`)."""

    def __init__(self, settings: IncidentSettings, shared: SharedCapture | None = None) -> None:
        self._settings = settings
        self.shared = shared or SharedCapture(settings.max_incidents)
        self._explosion = ExplosionWatch()  # a finite step the server would call critical
        self._group_paths: list[str] | None = None  # a group's own variables, by path
        self._variables: list[Any] = []
        self._shadows: list[tf.Variable] = []
        self._inner: Any = None
        self._batch = BatchCopy()
        self._copies = CopyBranch("incident_copies")  # kept a branch under XLA
        self._replicas = 1
        self._writes = True  # False on a multi-worker job's non-chief workers
        self._jit_compile = False  # whether the step that copies was traced for XLA
        self._rolling: bool | None = None  # decided at the first trace of the bad-step check
        self._snapshot = RollingSnapshot(settings.snapshot_every)
        self._first_step = 0
        self._state_bytes = 0
        self._policy_state: list[Any] = []  # the clip policy's variables
        self._policy_shadows: list[tf.Variable] = []  # their copies (a rolling capture only)
        # Batches as read (references, no copy): rows are formatted only when a bundle is written.
        self._recent: deque[StepBatch] = deque()
        # The last bundle's announcement while the rows after its step are still sent.
        self._following: dict[str, Any] | None = None
        self._sent_through = -1  # the last step whose row was sent with it
        self.enabled = False
        self._off = False  # capture is off for this run and the user was told why

    # -- building ------------------------------------------------------------------------

    @property
    def written(self) -> list[Path]:
        """The run's bundles written so far (every group's, for a group's capture)."""
        return self.shared.written

    def build(
        self,
        variables: Sequence[Any],
        inner: keras.optimizers.Optimizer,
        model: Any = None,
        first_step: int = 0,
        policy_state: Sequence[Any] = (),
    ) -> None:
        """Create the shadow variables (eagerly, once), or say why capture is off
        (``first_step``: the step the training starts at; ``policy_state``: the clip
        policy's variables, which a rolling capture copies with the state).

        A group's capture copies every trainable weight of ``model`` (the other groups'
        too: the replay runs the whole ``train_step``), and its own optimizer's state.
        """
        if self.enabled or self._off or self._settings.max_incidents == 0:
            return
        if self._settings.group is not None:
            if model is None:
                say(
                    f"incident capture of group {self._settings.group!r} is off: call "
                    f"monitor.set_model(model) in a custom loop"
                )
                self._off = True
                return
            self._group_paths = [bundle_path(v) for v in variables]
            variables = list(model.trainable_variables)
        strategy = tf.distribute.get_strategy()
        local = len(strategy.extended.worker_devices) if tf.distribute.has_strategy() else 1
        if strategy.num_replicas_in_sync > local:  # several workers: the chief writes
            task = cluster_task()
            self._writes = task is None or task.is_chief
        watched = [*variables, *inner.variables]
        size = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in watched)
        if size > self._settings.max_bytes:
            say(
                f"incident capture is off: the weights and optimizer state take {size:,} bytes, "
                f"more than incident_max_bytes={self._settings.max_bytes:,}"
            )
            self._off = True
            return
        self._state_bytes, self._first_step = size, first_step
        # Under tf.distribute the variables are mirrored; every replica computes the same
        # trigger from the all-reduced gradient and copies happen in cross-replica context.
        self._replicas = strategy.num_replicas_in_sync
        with tf.init_scope():
            self._shadows = [
                state_variable(tf.zeros(v.shape, v.dtype), v.dtype, "incident_copy")
                for v in watched
            ]
            self._policy_state = list(policy_state)
            self._armed = self.shared.armed
            self._pending = state_variable(False, tf.bool, "incident_pending")
            self._step = state_variable(-1, tf.int64, "incident_step")
            self._cause = state_variable(0, tf.int32, "incident_cause")
            self._batch.build()
            self._copies.build()
            self._explosion.build()
        self._variables, self._inner = watched, inner
        self.shared.prepare(model)  # a custom loop's RNG states (fit copies them in-graph)
        self._trainable = len(variables)
        self.enabled = True

    # -- in-graph ------------------------------------------------------------------------

    def before_update(self, step: Any, global_norm: Any, nonfinite: Any, skipped: Any) -> None:
        """In-graph, before the inner optimizer's update: copy the state if this step is bad.

        Args:
            step: The step (int64 scalar); ``global_norm``: its norm before the policy;
            nonfinite: per-layer non-finite counts; ``skipped``: the policy's skip flag.
        """
        if not self.enabled:
            return
        bad_gradient = tf.logical_or(
            tf.logical_not(tf.math.is_finite(global_norm)), tf.reduce_any(nonfinite > 0)
        )
        explosion = (
            self._explosion.update(global_norm, skipped)
            if self._settings.explosion
            else tf.constant(False)
        )
        cause = tf.where(bad_gradient, 0, tf.where(skipped, 1, 2))
        self._copy_if(bad_gradient | skipped | explosion, cause, step)

    def on_overflow(self, step: Any, loss: Any, loss_known: Any, loss_scale: Any) -> None:
        """In-graph, on a step a ``LossScaleOptimizer`` skips for overflow, before it changes
        its scale: copy the state if the overflow is not the scaling's doing, i.e. the
        step's loss is non-finite (the forward pass broke) or the scale is down to 1 (the
        float16 gradient overflows unscaled). An overflow at a high scale is the loss
        scaling at work and is not captured. The skipped update leaves the weights and the
        inner optimizer's state as they were before the step, so the copy is exact. Under
        ``MirroredStrategy`` this runs in cross-replica context, where the LSO decides (on
        the all-reduced gradient): the copy is made once, as for any bad step.

        Args:
            step: The step (int64 scalar); ``loss``: its unscaled loss (float32 scalar);
            loss_known: Scalar bool, whether the step's loss was seen at all;
            loss_scale: The LSO's scale before this step (float32 scalar) or ``None``.
        """
        if not self.enabled:
            return
        if many_replicas() is not None:
            # The LSO judged the step in replica context (strategies without merge_call: XLA
            # on GPUs only); a merge_call in its cond's branch is not allowed there.
            say(
                "a LossScaleOptimizer's overflow steps are not captured under this "
                "tf.distribute strategy (XLA on GPUs decides them in replica context)"
            )
            return
        broken = tf.logical_and(loss_known, tf.logical_not(tf.math.is_finite(loss)))
        if loss_scale is not None:
            broken = tf.logical_or(broken, loss_scale <= 1.0)
        self._copy_if(broken, tf.constant(0), step)

    def _copy_if(self, bad: Any, cause: Any, step: Any) -> None:
        """In-graph: when ``bad`` and armed, copy the state and mark the step's batch due
        (``cause``: int32 index into ``_CAUSES``). Under several replicas the decision (the
        same on every replica) and the copy are made once, in cross-replica context."""
        self._jit_compile = compat.in_xla_context()
        if self._rolling is None:
            self._rolling = self._rolls()
        trigger = tf.logical_and(bad, self._armed)
        if self._rolling:  # the state was copied after an earlier step's update
            self._batch.note_step(step)
            self._copy_when(trigger, cause, step, copy_state=False)
            return
        replica = many_replicas()
        if replica is None:
            self._copy_when(trigger, cause, step)
            return

        def across(distribution: Any, trigger: Any, cause: Any, step: Any) -> None:
            def first(value: Any) -> Any:
                return distribution.experimental_local_results(value)[0]

            self._copy_when(first(trigger), first(cause), first(step))

        replica.merge_call(across, args=(trigger, cause, step))

    def _rolls(self) -> bool:
        """At the first trace of the check: whether this capture rolls (see
        :mod:`.incident_rolling`); if so, size the batch ring and copy the state the first
        step begins with."""
        settings, every = self._settings, self._settings.snapshot_every
        if not rolls(
            every=every,
            batch_bytes=self.shared.batch_bytes,  # None: not fit (a custom loop)
            state_bytes=self._state_bytes,
            max_bytes=settings.max_bytes,
            possible=self._jit_compile
            and self._replicas == 1
            and settings.group is None
            and not self._inner.gradient_accumulation_steps,
        ):
            return False
        self._batch.slots = every
        with tf.init_scope():  # only a rolling copy keeps the policy's state
            self._policy_shadows = [
                state_variable(tf.zeros(v.shape, v.dtype), v.dtype, "incident_policy")
                for v in self._policy_state
            ]
        self._snapshot.build(self._first_step, lambda: self._copy_state(between_steps=True))
        return True

    def _copy_state(self, between_steps: bool = False) -> None:
        for shadow, variable in zip(self._shadows, self._variables, strict=True):
            shadow.assign(variable)
        if between_steps:  # the policy's state the next step begins with (a rolling copy)
            for shadow, variable in zip(self._policy_shadows, self._policy_state, strict=True):
                shadow.assign(variable)
        self.shared.copy_model_state(between_steps)

    def after_update(self, step: Any) -> None:
        """In-graph, after step ``step``'s update: a rolling capture's copy of the state
        every ``incident_snapshot_every`` steps (nothing otherwise)."""
        if self.enabled and self._rolling:
            self._snapshot.after_update(
                step, self._armed, lambda: self._copy_state(between_steps=True)
            )

    def _copy_when(self, trigger: Any, cause: Any, step: Any, copy_state: bool = True) -> None:
        def copy() -> None:
            if copy_state:
                self._copy_state()
            self._armed.assign(False)
            self._pending.assign(True)
            self._batch.mark_due()
            self._step.assign(tf.cast(step, tf.int64))
            self._cause.assign(tf.cast(cause, tf.int32))

        self._copies(trigger, copy)

    def capture_batch(self, data: Any) -> None:
        """In-graph, at the end of a train step: copy its batch if that step was captured."""
        if self.enabled:
            self._batch.capture(data, self._armed if self._rolling else None)

    # -- host side -----------------------------------------------------------------------

    def remember(self, batches: Sequence[StepBatch]) -> None:
        """Host, before :meth:`write_if_pending`: the batches of a ring read (no copy)."""
        if self.enabled:
            self._recent.extend(batches)

    def forget(self) -> None:
        """Host, after :meth:`write_if_pending`: keep only the batches holding the last
        ``recorder_steps`` rows, so a step captured in the next read still has that many
        rows before it, however many this read held after it."""
        wanted = max(1, self._settings.recorder_steps)
        while self._recent and (
            sum(len(b.step) for b in self._recent) - len(self._recent[0].step) >= wanted
        ):
            self._recent.popleft()

    def _recorded_rows(self, step: int) -> list[dict[str, Any]]:
        """The last ``recorder_steps`` recorded rows up to ``step``, as JSON-able dicts."""
        return recorded_rows(self._recent, step, self._settings.recorder_steps)

    def write_if_pending(self, model: Any) -> dict[str, Any] | None:
        """Host, after a ring read: write the bundle of a captured step (one scalar read when
        there is none) and return its announcement for the server (wire ``incidents`` item).
        Blocks on the checkpoint write; never raises (logs instead)."""
        if not self.enabled or not bool(self._pending.numpy()):
            return None
        self._pending.assign(False)
        if not self._writes:  # a non-chief worker: the chief writes the (same) bundle
            self.shared.captured(None)
            return None
        try:
            path, manifest = self._write(model)
        except Exception:
            log.exception("gradwatch: could not write the incident bundle")
            self.shared.captured(None)
            return None
        self.shared.captured(path)
        announced = announcement(path, manifest)
        self._following, self._sent_through = announced, manifest["step"]
        return announced

    def rows_after(self, batches: Sequence[StepBatch]) -> dict[str, Any] | None:
        """Host, after :meth:`write_if_pending` on the same ring read: the last bundle's
        announcement again, with the recorder's rows of ``batches`` that follow the rows
        already sent, up to ``recorder_steps`` steps after the bad one (the server merges
        them by step), or ``None`` when there are none. O(rows read); never raises."""
        following = self._following
        if following is None:
            return None
        until = following["step"] + self._settings.recorder_steps
        rows = recorded_rows(batches, until, self._settings.recorder_steps, self._sent_through)
        if not rows:
            return None
        self._sent_through = rows[-1]["step"]
        if self._sent_through >= until:
            self._following = None
        rows = [{**row, **(self.shared.position(row["step"]) or {})} for row in rows]
        return {**following, "recorded": recorded_columns(rows)}

    def _write(self, model: Any) -> tuple[Path, dict[str, Any]]:
        started = time.perf_counter()
        step = int(self._step.numpy())
        settings = self._settings
        directory = settings.directory / settings.run_id / f"step-{step}"
        directory.mkdir(parents=True, exist_ok=True)
        rolled = None
        if self._rolling:
            rolled = bundle_parts(
                self._snapshot, self._batch, step, self._policy_state, self._policy_shadows
            )
            slot = rolled.slot
        else:
            slot = 0 if self._batch.written() else None
        batch, shapes = self._batch.slot(slot) if slot is not None else ([], [])
        checkpoint = tf.train.Checkpoint(
            weights=self._shadows[: self._trainable],
            optimizer=self._shadows[self._trainable :],
            batch=batch,
            batch_shape=shapes,
            rng=self.shared.seed_captured,
            model_state=self.shared.state_captured,
            **(rolled.checkpoint if rolled else {}),
        )
        prefix = checkpoint.write(str(directory / "state"))
        size = sum(p.stat().st_size for p in directory.glob("state*"))
        manifest = {
            "format": ROLLING_FORMAT if rolled else BUNDLE_FORMAT,
            "run_id": settings.run_id,
            "run": settings.run,
            "step": step,
            "cause": _CAUSES[int(self._cause.numpy())],
            "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "jit_compile": self._jit_compile,
            "group": self._settings.group,
            "group_variables": self._group_paths,
            "checkpoint": Path(prefix).name,
            "bytes": size,
            "policy": settings.policy,
            "learning_rate": learning_rate(self._inner),
            "optimizer": keras.optimizers.serialize(self._inner),
            "model": model_description(model),
            "weights": [describe(v) for v in self._variables[: self._trainable]],
            "optimizer_variables": [describe(v) for v in self._variables[self._trainable :]],
            # fit only (null in custom loops): RNG states at the step's start; the other
            # non-trainable variables (batch-norm statistics) after its forward pass. Rolling:
            # both (and the weights and optimizer state) as roll_forward.from_step began.
            **self.shared.describe_model_state(),
            "roll_forward": rolled.manifest if rolled else None,
            "batch": self._batch.describe() if slot is not None else None,
            # The replicas the step ran on; the batch is the global one (their shards).
            "replicas": self._replicas,
            # n: the step averaged n micro-batches; the batch is the last one, and the
            # optimizer state holds the sum of the others' gradients (its accumulators).
            "gradient_accumulation_steps": self._inner.gradient_accumulation_steps,
            "layers": list(self._recent[-1].layers) if self._recent else [],
            "position": self.shared.position(step),
            "recorded": [
                {**row, **(self.shared.position(row["step"]) or {})}
                for row in self._recorded_rows(step)
            ],
        }
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if rolled and rolled.earlier.missing:
            missing = rolled.earlier.missing
            say(
                f"step {step}: the batches of steps {missing[0]}–{missing[-1]} were not kept, "
                f"so its replay cannot run forward from the copy of step {rolled.earlier.begins}"
            )
        held = (
            f"the state step {rolled.earlier.begins} began with and the batches since"
            if rolled
            else "its weights, optimizer state and batch"
            if slot is not None
            else "its weights and optimizer state (not its batch)"
        )
        say(
            f"step {step} {_SAID[manifest['cause']]}: {held} are in {directory} "
            f"({size / 2**20:.1f} MiB, written in {time.perf_counter() - started:.2f} s); "
            f"replay it with "
            f"`gradwatch replay {directory}`"
        )
        return directory, manifest
