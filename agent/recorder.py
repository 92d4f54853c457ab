"""StepRecorder: a monitor's step pipeline, from the gradients in the train step to batches.

In-graph, inside the train step (called by
:class:`~gradwatch.agent.optimizer.MonitoredOptimizer`): compute the step's
statistics, apply the clip policy, and write one row into the
:class:`~gradwatch.agent.ring.Ring`. On the host, between steps (called by the
monitor's callback hooks or ``on_step``): take and measure weight snapshots
every ``stats_every`` steps, and every ``flush_every`` steps read the ring and
submit its rows as :class:`~gradwatch.agent.records.StepBatch`\\ es.

The ring holds ``flush_every + steps_per_execution`` rows: the host reads as
soon as ``flush_every`` steps may be pending, and at most
``steps_per_execution`` more run before the next callback, so no row is
overwritten unread. Steps lost anyway (a custom loop that calls ``on_step``
too rarely) are counted in :attr:`StepRecorder.lost_steps`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from . import _keras_compat as compat
from .clip import ClipContext, ClipPolicy
from .clip.base import state_variable
from .config import ConfigError, MonitorConfig
from .incident import IncidentCapture, IncidentSettings, SharedCapture
from .layers import LayerLayout, layout_of
from .records import StepBatch
from .ring import Ring, StepRow
from .stats import compute_gradient_stats
from .weights import WeightSnapshot, read_weights, weight_stats

__all__ = ["GROUP_APPLIES_PER_STEP", "StepRecorder"]

GROUP_APPLIES_PER_STEP = 8
"""Applies of one group per ``train_step`` its ring has room for (a WGAN critic: 5);
rows beyond that are overwritten before the host reads them, and counted as lost."""

log = logging.getLogger("gradwatch.agent")


class StepRecorder:
    """Measures, clips and records the steps of one monitor.

    Training-thread object, not thread-safe. The in-graph methods
    (:meth:`process`, :meth:`record_row`, :meth:`record_overflow_step`,
    :meth:`record_loss`) never sync with the host; the host methods block only
    on reading the ring (a few KB) and on :func:`submit`, which never blocks.

    Args:
        config: The monitor's settings (``flush_every``, ``stats_every``).
        policy: The clip policy, or ``None``.
        submit: Where batches go (the sender's non-blocking ``submit``).
        checkpointed: The trackable that ``tf.train.Checkpoint`` saves: the
            step counter and the policy state are attached to it.
        owners: Called once at build: ``variable_key`` → layer path from the
            model's layer tree (:func:`~gradwatch.agent.layers.layer_paths`), or
            ``None`` to name layers by variable paths.
        group: The optimizer group this recorder records (:mod:`gradwatch.agent.groups`),
            or ``None`` for a monitor's only optimizer. A group's layers are named
            ``group/...``, its policy state is checkpointed as ``policy_<group>``, and it
            does not advance the run's step itself: the monitor advances it once per
            ``train_step`` (:meth:`advance_step`), however many groups applied.
    """

    def __init__(
        self,
        config: MonitorConfig,
        policy: ClipPolicy | None,
        submit: Callable[[StepBatch], object],
        checkpointed: Any,
        owners: Callable[[], Mapping[object, str] | None] = lambda: None,
        group: str | None = None,
        model: Callable[[], Any] = lambda: None,
        shared: SharedCapture | None = None,
    ) -> None:
        self._config = config
        self._owners = owners
        self._group = group
        self._policy = policy
        self._submit = submit
        self._announcements: list[dict[str, Any]] = []
        self._checkpointed = checkpointed
        self._model = model
        assert config.incident_dir is not None
        self.incidents = IncidentCapture(
            IncidentSettings(
                directory=config.incident_dir,
                max_incidents=config.max_incidents,
                max_bytes=config.incident_max_bytes,
                recorder_steps=config.recorder_steps,
                run_id=config.run_id,
                run=config.run,
                policy=policy.describe() if policy is not None else None,
                group=group,
                explosion=config.incident_on_explosion,
                snapshot_every=config.incident_snapshot_every,
            ),
            shared,
        )
        self.ring: Ring | None = None
        self.steps_per_call = 1  # steps per host callback (steps_per_execution)
        self.weights_in_step = False  # trace time: the step measures itself (see module doc)
        self._every_step = config.stats_every == 1  # every step measured in-step, no snapshot
        self._var_segments: dict[object, int] = {}
        self._variables: list[Any] = []  # as built: what an overflow step measures
        self._snapshot: WeightSnapshot | None = None  # None: weight statistics off
        self._until_snapshot = 0  # micro-batches until the next weight snapshot
        self._measure_tries = 0  # host calls left to measure the step after the snapshot
        self._measure_fn: Any = None  # the host-called measurement, for the current ring
        self._accumulation = 1  # micro-batches per recorded step
        self._inner: Any = None  # the wrapped optimizer, for the flight recorder's scalars
        self.loss_scaler: Any = None
        """The ``LossScaleOptimizer`` whose inner optimizer ``fit`` wraps (its scale is
        recorded), set by the callback while it hooks it; else ``None``."""
        self._unread_estimate = 0
        self._read_count: int | None = None
        self._lost_steps = 0
        self._read_steps = 0
        # Trace time, for LossCapture: whether the train step being traced recorded a loss
        # and wrote a row (reset by LossCapture at the start of each train_step trace).
        self.traced_loss = False
        self.traced_row = False

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in reporting order (empty until built)."""
        return self.ring.layout.names if self.ring is not None else ()

    @property
    def lost_steps(self) -> int:
        """Steps overwritten in the ring before the host read them."""
        return self._lost_steps

    @property
    def recorded_steps(self) -> int:
        """Steps read from the ring so far (submitted or lost), cumulative."""
        return self._read_steps + self._lost_steps

    # -- building ------------------------------------------------------------------------

    def build(self, variables: Sequence[Any], inner: keras.optimizers.Optimizer) -> None:
        """Create the in-graph state for ``variables`` (once).

        Runs eagerly even when Keras builds the optimizer during tracing (as it
        may under a distribution strategy): variables are lifted out of the graph.
        """
        if self.ring is not None:
            return
        with tf.init_scope():
            layout = layout_of(variables, self._owners(), compat.variable_key, self._group)
            self.ring = Ring(layout, self._capacity(), self._weights_on)
            self._var_segments = {
                compat.variable_key(v): seg
                for v, seg in zip(variables, layout.segment_ids, strict=True)
            }
            self._variables = list(variables)
            self._accumulation = inner.gradient_accumulation_steps or 1
            self._inner = inner
            # Tracked attributes: a checkpoint restored before this point is applied now.
            if self._group is None or getattr(self._checkpointed, "step", None) is None:
                first_step = int(inner.iterations.numpy()) if inner.built else 0
                self._checkpointed.step = state_variable(first_step, tf.int64, "step")
            if self._policy is not None:
                setattr(
                    self._checkpointed, self._policy_attribute, self._policy.init(variables, layout)
                )
            self._read_count = 0
            step = int(self._checkpointed.step.numpy())
            policy_state = getattr(self._checkpointed, self._policy_attribute, None)
            self.incidents.build(
                variables, inner, self._model(), step, getattr(policy_state, "variables", ())
            )
            if self._weights_on and not self._every_step:
                keys = [compat.variable_key(v) for v in variables]
                self._snapshot = WeightSnapshot(variables, keys, step)
                self._until_snapshot = self._config.stats_every * self._accumulation
                self._measure_tries = self._accumulation  # custom loops: measure the first step

    def ensure_capacity(self) -> bool:
        """Grow the ring if ``steps_per_call`` needs more rows; True if it grew."""
        ring = self.ring
        if ring is None or ring.capacity >= self._capacity():
            return False
        self.collect()
        self.ring = Ring(ring.layout, self._capacity(), self._weights_on)
        self._measure_fn = None  # traced with the old ring
        self._read_count = 0
        return True

    def begin_fit(self) -> bool:
        """Host, at the start of ``fit`` (after :meth:`ensure_capacity`): snapshot the weights.

        Decides whether the train step measures its weights itself (with
        ``steps_per_execution`` > 1 there is no host call between its steps).

        Returns:
            Whether that decision changed, so the train function must be retraced.
        """
        in_step = self._snapshot is not None and self.steps_per_call > 1
        changed = in_step != self.weights_in_step
        self.weights_in_step = in_step
        self.snapshot_weights()  # the weights may have changed since the last fit
        return changed

    # -- in-graph ------------------------------------------------------------------------

    def record_loss(self, loss: Any) -> None:
        """Record the current step's loss (in-graph; no host sync)."""
        if self.ring is None:
            return
        self.traced_loss = True
        value = tf.cast(tf.reduce_mean(loss), tf.float32)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Keras scales each replica's loss by 1/N; their sum is the global mean.
            value = replica.all_reduce(tf.distribute.ReduceOp.SUM, value)
        self.ring.add_loss(value)

    def record_late_loss(self, loss: Any) -> None:
        """In-graph, at the end of a ``train_step``: the loss of the row it wrote.

        For a custom ``train_step`` that never passed its loss through
        ``optimizer.scale_loss`` (see :mod:`gradwatch.agent.step_loss`). Under
        ``tf.distribute`` the replicas' losses are averaged (a custom step's loss is
        its replica's mean, unscaled).
        """
        if self.ring is None:
            return
        value = tf.cast(tf.reduce_mean(loss), tf.float32)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            value = replica.all_reduce(tf.distribute.ReduceOp.MEAN, value)
        self.ring.set_last_loss(value)

    def process(
        self, grads: list[Any], variables: list[Any]
    ) -> tuple[list[Any], tf.Tensor | None, StepRow]:
        """In-graph: measure and clip one step. Returns (grads, skip or None, row to record)."""
        layout = self._layout_for(variables)
        before = read_weights(variables) if self._every_step else None
        stats = compute_gradient_stats(grads, layout)
        skip: tf.Tensor | None = None
        coef = tf.constant(1.0)
        norm_after = stats.global_norm
        step = self._checkpointed.step.read_value()
        if self._policy is not None:
            result = self._policy.apply(
                grads,
                getattr(self._checkpointed, self._policy_attribute),
                ClipContext(stats, variables, layout, step),
            )
            grads, coef, skip = result.grads, result.clip_coef, result.skip
            after = (
                result.stats if result.stats is not None else compute_gradient_stats(grads, layout)
            )
            norm_after = after.global_norm
        row = StepRow(
            step=step,
            layout=layout,
            global_norm=stats.global_norm,
            global_norm_clipped=norm_after,
            clip_coef=coef,
            skipped=tf.constant(False) if skip is None else skip,
            layer_norms=stats.layer_norms,
            layer_nonfinite=stats.layer_nonfinite,
            weights_before=before,
            **self._optimizer_scalars(),
        )
        return grads, skip, row

    def _optimizer_scalars(self) -> dict[str, tf.Tensor | None]:
        """In-graph: the learning rate this step applies and the loss scale, for the ring.

        ``learning_rate`` is Keras' public property (a schedule's value at the
        current iteration); ``dynamic_scale`` is a ``LossScaleOptimizer``'s.
        """
        inner = self._inner
        scale = getattr(self.loss_scaler or inner, "dynamic_scale", None)
        return {
            "learning_rate": tf.cast(inner.learning_rate, tf.float32),
            "loss_scale": None if scale is None else tf.cast(scale, tf.float32),
        }

    def before_update(self, row: StepRow) -> None:
        """In-graph, after the policy and before the update: capture the state of a bad step."""
        self.incidents.before_update(row.step, row.global_norm, row.layer_nonfinite, row.skipped)

    def record_row(self, row: StepRow, variables: Sequence[Any]) -> None:
        """In-graph, after the update: write ``row`` into the ring and advance the step counter.

        Measures the weights of ``variables`` too: on every step when
        ``stats_every`` is 1 (from ``row.weights_before``), and with
        ``steps_per_execution`` > 1 on the step after a snapshot.
        """
        state = self.ring
        assert state is not None, "the wrapped optimizer was not built"
        self.traced_row = True
        self.incidents.after_update(row.step)
        snapshot = self._snapshot if self.weights_in_step else None
        before = row.weights_before
        if self._every_step:
            weights = read_weights(variables)
            # No weights read before: an overflow step the update never touched (Δw = 0).
            measured = weights if before is None else before
            state.write(row, True, lambda: weight_stats(weights, measured, row.layout))
        elif snapshot is None:
            state.write(row, tf.constant(False))
        else:
            keys = [compat.variable_key(v) for v in variables]
            state.write(
                row,
                tf.equal(row.step, snapshot.step),
                lambda: snapshot.measure(variables, keys, row.layout),
            )
        if self._group is None:
            self._checkpointed.step.assign_add(1)

    def advance_step(self) -> None:
        """Count one ``train_step`` of a monitor with groups (in-graph, or eagerly in a loop)."""
        step = getattr(self._checkpointed, "step", None)
        if step is not None:
            step.assign_add(1)

    def _measure_last_step(self) -> None:
        """Traced into :attr:`_measure_fn`: measure the last recorded step if it is due.

        Due: it is the step after the snapshot and was not measured yet.
        """
        state, snapshot = self.ring, self._snapshot
        assert state is not None
        assert snapshot is not None
        keys = [compat.variable_key(v) for v in self._variables]
        state.weigh_last_if(
            snapshot.step, lambda: snapshot.measure(self._variables, keys, state.layout)
        )

    def record_overflow_step(self) -> None:
        """In-graph: record a step the LossScaleOptimizer skipped because of overflow.

        The scaled gradient overflowed, so no norm of the unscaled gradient can be
        measured: the step is reported skipped, with NaN norms, clip coefficient 0
        and no non-finite values (the model's own gradient was not at fault); its
        weights are measured as on any step (unchanged: update ratio 0).
        """
        state = self.ring
        if state is None:
            return
        layout = state.layout
        nan = tf.constant(float("nan"), tf.float32)
        step = self._checkpointed.step.read_value()
        scalars = self._optimizer_scalars()
        self.incidents.on_overflow(
            step, state.pending_loss(), state.loss_count > 0, scalars["loss_scale"]
        )
        row = StepRow(
            step=step,
            layout=layout,
            global_norm=nan,
            global_norm_clipped=tf.constant(0.0),
            clip_coef=tf.constant(0.0),
            skipped=tf.constant(True),
            layer_norms=tf.fill([layout.num_layers], nan),
            layer_nonfinite=tf.zeros([layout.num_layers], tf.int32),
            **scalars,
        )
        self.record_row(row, self._variables)

    # -- host side -----------------------------------------------------------------------

    def before_step(self) -> None:
        """Host, before a step: snapshot the weights if one is due (``stats_every``)."""
        if self._until_snapshot <= 0:
            self.snapshot_weights()

    def after_steps(self, steps: int) -> None:
        """Host, after ``steps`` steps (one call): measure weights, read the ring if due."""
        self._measure_weights()
        self._unread_estimate += steps
        self._until_snapshot -= steps
        self._collect_if_due()

    def collect(self) -> None:
        """Host side: read the steps recorded since the last read and submit them."""
        self._unread_estimate = 0
        state = self.ring
        if state is None or self._read_count is None:
            return
        read = state.read(self._read_count)
        self._read_count = read.recorded
        if read.lost:
            self._lost_steps += read.lost
            log.warning(
                "gradwatch: %d steps were overwritten before they were read; "
                "call on_step() after every step",
                read.lost,
            )
        batches = list(read.batches)
        self._read_steps += sum(len(batch) for batch in batches)
        self.incidents.remember(batches)
        announced = self.incidents.write_if_pending(self._model())
        if announced is not None:
            self._announcements.append(announced)
        following = self.incidents.rows_after(batches)  # the recorder's rows after a bad step
        if following is not None:
            self._announcements.append(following)
        self.incidents.forget()
        if self._announcements and batches:  # the server learns of a bundle with a batch
            batches[-1] = dataclasses.replace(batches[-1], incidents=tuple(self._announcements))
            self._announcements.clear()
        for batch in batches:
            self._submit(batch)

    def _collect_if_due(self) -> None:
        """Read once ``flush_every`` steps may be pending (micro-batches counted by the caller)."""
        if self._unread_estimate >= self._config.flush_every * self._accumulation:
            self.collect()

    def snapshot_weights(self) -> None:
        """Host side: copy the weights before the next step, to measure that step.

        With ``steps_per_execution`` > 1 this happens between executions, so the
        step measured is the first of the next one. No-op when stats are off.
        """
        if self._snapshot is None:
            return
        self._snapshot.take(self._checkpointed.step)
        self._until_snapshot = self._config.stats_every * self._accumulation
        # The step after the snapshot is recorded within one gradient accumulation cycle.
        self._measure_tries = 0 if self.weights_in_step else self._accumulation

    def _measure_weights(self) -> None:
        """Host side, after a step: measure it if it is the step after the snapshot.

        One call of a compiled function that reads the weights and writes the
        last ring row; a no-op there while that step has not been recorded yet.
        """
        snapshot = self._snapshot
        if snapshot is None or self._measure_tries <= 0:
            return
        self._measure_tries -= 1
        if self._measure_fn is None:
            self._measure_fn = tf.function(self._measure_last_step, autograph=False)
        with snapshot.strategy.scope():
            self._measure_fn()

    @property
    def policy(self) -> ClipPolicy | None:
        """The clip policy applied here, or ``None``."""
        return self._policy

    @property
    def group(self) -> str | None:
        """The optimizer group recorded here, or ``None`` for a monitor's only optimizer."""
        return self._group

    @property
    def _policy_attribute(self) -> str:
        return "policy" if self._group is None else f"policy_{self._group}"

    def _capacity(self) -> int:
        rows_per_step = 1 if self._group is None else GROUP_APPLIES_PER_STEP
        return (self._config.flush_every + self.steps_per_call) * rows_per_step

    @property
    def _weights_on(self) -> bool:
        return self._config.stats_every > 0

    def _layout_for(self, variables: Sequence[Any]) -> LayerLayout:
        """The layer groups of ``variables``, in the order given."""
        ring = self.ring
        assert ring is not None, "the wrapped optimizer was not built"
        try:
            segments = tuple(self._var_segments[compat.variable_key(v)] for v in variables)
        except KeyError:
            raise ConfigError(
                "variables: apply() got a variable the optimizer was not built with"
            ) from None
        return LayerLayout(ring.layout.names, segments)
