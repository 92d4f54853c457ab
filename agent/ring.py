"""The in-graph ring buffer of per-step rows, written inside the train step and read by the host.

The train step writes one row per recorded step at ``recorded % capacity`` with
``tensor_scatter_nd_update`` (no host sync); the host reads all rows written
since its last read in one go, every ``flush_every`` steps, and turns them into
:class:`~gradwatch.agent.records.StepBatch`\\ es. The monitor sizes the ring
(``flush_every + steps_per_execution`` rows) so no row is overwritten unread;
rows lost anyway are counted by :meth:`Ring.read`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from .clip.base import state_variable
from .layers import LayerLayout
from .records import StepBatch

__all__ = ["Ring", "RingRead", "StepRow"]

# Columns of the per-step run buffer (_WEIGHED: weight statistics were measured;
# _LR, _LOSS_SCALE: the flight recorder's learning rate and loss scale, NaN where unknown).
_LOSS, _LOSS_KNOWN, _GLOBAL, _GLOBAL_CLIPPED, _COEF, _SKIPPED, _WEIGHED, _LR, _LOSS_SCALE = range(9)
_RUN_COLUMNS = 9


@dataclass(frozen=True, slots=True)
class StepRow:
    """One step's gradient statistics (tensors), measured before the update and written after it."""

    step: tf.Tensor
    layout: LayerLayout
    global_norm: tf.Tensor
    global_norm_clipped: tf.Tensor
    clip_coef: tf.Tensor
    skipped: tf.Tensor
    layer_norms: tf.Tensor
    layer_nonfinite: tf.Tensor
    weights_before: tuple[tf.Tensor, ...] | None = None
    """The trainable weights read before the update, when every step's weights are measured."""
    learning_rate: tf.Tensor | None = None
    """The learning rate the update applied (a schedule's value at this step), or ``None``."""
    loss_scale: tf.Tensor | None = None
    """A ``LossScaleOptimizer``'s scale at this step, or ``None``."""


@dataclass(frozen=True, slots=True)
class RingRead:
    """What one host read of the ring found.

    Attributes:
        recorded: Rows written so far (the ``since`` of the next read).
        lost: Rows overwritten before this read could see them.
        batches: The rows read, one batch per increasing run of steps.
    """

    recorded: int
    lost: int
    batches: list[StepBatch]


def _write_row(buffer: tf.Variable, row: tf.Tensor, value: tf.Tensor) -> None:
    """Write one ring-buffer row (``row`` is ``[[index]]``).

    A whole-buffer assign of ``tensor_scatter_nd_update`` rather than the
    variable's own ``scatter_nd_update``, which mirrored variables lack; the
    buffer is a few KB and XLA updates it in place.
    """
    buffer.assign(tf.tensor_scatter_nd_update(buffer.read_value(), row, value))


def _or_nan(value: tf.Tensor | None) -> tf.Tensor:
    return tf.constant(float("nan")) if value is None else tf.cast(value, tf.float32)


def _weight_columns(
    weights: np.ndarray[Any, Any] | None, known: np.ndarray[Any, Any], part: np.ndarray[Any, Any]
) -> dict[str, Any]:
    """The StepBatch weight fields for rows ``part`` of a ring read (none when weights are off)."""
    if weights is None:
        return {}
    return {
        "weight_norm": weights[part, 0].astype(np.float32),
        "update_ratio": weights[part, 1].astype(np.float32),
        "weights_known": known,
    }


class Ring(tf.Module):
    """The in-graph ring buffers (never checkpointed; rebuilt when the ring must grow).

    Rows are indexed by ``recorded % capacity``, a count of rows written by this
    process, so restoring the checkpointed step counter never confuses reading.
    The loss is the mean of the losses recorded since the last row (one, or the
    micro-batches of a step with gradient accumulation).

    Build it eagerly under the model's distribution strategy scope (its
    variables are mirrored). The ``add_loss``/``write*`` methods run in-graph
    inside the train step; :meth:`read` runs on the host between steps. Not
    thread-safe: the training thread owns it.

    Args:
        layout: The layer groups (one column per layer).
        capacity: Rows in the ring.
        weights: Whether to keep weight-norm and update-ratio columns.
    """

    def __init__(self, layout: LayerLayout, capacity: int, weights: bool) -> None:
        super().__init__(name="gradwatch_ring")
        var = state_variable
        num_layers = layout.num_layers
        self.layout = layout
        self.capacity = capacity
        self.recorded = var(0, tf.int64, "recorded")
        self.loss_sum = var(0.0, tf.float32, "loss_sum")
        self.loss_count = var(0, tf.int32, "loss_count")
        self.step_buf = var(tf.fill([capacity], tf.constant(-1, tf.int64)), tf.int64, "step_buf")
        self.run_buf = var(tf.zeros([capacity, _RUN_COLUMNS]), tf.float32, "run_buf")
        self.norm_buf = var(tf.zeros([capacity, num_layers]), tf.float32, "norm_buf")
        self.nonfinite_buf = var(
            tf.zeros([capacity, num_layers], tf.int32), tf.int32, "nonfinite_buf"
        )
        # Row i: the weight norms and the update ratios, meaningful where _WEIGHED is set.
        self.weight_buf = (
            var(tf.zeros([capacity, 2, num_layers]), tf.float32, "weight_buf") if weights else None
        )

    def add_loss(self, value: tf.Tensor) -> None:
        """In-graph: add one (scalar float32) loss to the next row's mean."""
        self.loss_sum.assign_add(value)
        self.loss_count.assign_add(1)

    def pending_loss(self) -> tf.Tensor:
        """In-graph: the mean of the losses added for the next row (NaN when none was;
        :attr:`loss_count` > 0 tells)."""
        count = self.loss_count.read_value()
        mean = self.loss_sum.read_value() / tf.cast(tf.maximum(count, 1), tf.float32)
        return tf.where(count > 0, mean, float("nan"))

    def write(
        self,
        row: StepRow,
        weigh: tf.Tensor | bool,
        measure: Callable[[], tf.Tensor] | None = None,
    ) -> None:
        """In-graph: write ``row`` (with the loss mean since the last row) at the next index.

        Args:
            row: The step's statistics.
            weigh: Scalar bool: ``measure`` runs on this step (its columns are
                valid); Python ``True``: on every step, without a ``tf.cond``.
            measure: Returns the ``[2, num_layers]`` weight norms and update
                ratios; ``None`` when this step cannot measure them.
        """
        index = tf.reshape(tf.math.floormod(self.recorded.read_value(), self.capacity), [1, 1])
        count = self.loss_count.read_value()
        loss = self.pending_loss()
        run_row = tf.stack(
            [
                loss,
                tf.cast(count > 0, tf.float32),
                tf.cast(row.global_norm, tf.float32),
                tf.cast(row.global_norm_clipped, tf.float32),
                tf.cast(row.clip_coef, tf.float32),
                tf.cast(row.skipped, tf.float32),
                tf.cast(weigh, tf.float32),
                _or_nan(row.learning_rate),
                _or_nan(row.loss_scale),
            ]
        )
        _write_row(self.step_buf, index, tf.reshape(row.step, [1]))
        _write_row(self.run_buf, index, run_row[tf.newaxis])
        _write_row(self.norm_buf, index, tf.cast(row.layer_norms, tf.float32)[tf.newaxis])
        _write_row(self.nonfinite_buf, index, tf.cast(row.layer_nonfinite, tf.int32)[tf.newaxis])
        if measure is not None and self.weight_buf is not None:
            if weigh is True:
                values = measure()
            else:
                values = tf.cond(weigh, measure, lambda: tf.zeros([2, row.layout.num_layers]))
            _write_row(self.weight_buf, index, values[tf.newaxis])
        self.loss_sum.assign(0.0)
        self.loss_count.assign(0)
        self.recorded.assign_add(1)

    def set_last_loss(self, value: tf.Tensor) -> None:
        """In-graph: give the last row written its loss (a ``train_step`` that found it late).

        Args:
            value: Scalar float32, the step's loss.
        """
        index = tf.math.floormod(self.recorded.read_value() - 1, self.capacity)
        cells = tf.stack(
            [
                tf.stack([index, tf.constant(_LOSS, tf.int64)]),
                tf.stack([index, tf.constant(_LOSS_KNOWN, tf.int64)]),
            ]
        )
        self.run_buf.assign(
            tf.tensor_scatter_nd_update(
                self.run_buf.read_value(), cells, tf.stack([value, tf.constant(1.0)])
            )
        )

    def weigh_last_if(self, step: tf.Tensor, measure: Callable[[], tf.Tensor]) -> None:
        """In-graph: fill the weight columns of the last row if it is ``step`` and has none.

        Measures whether due or not and keeps the row as it was where not: a
        ``tf.cond`` would capture every weight and its copy into a branch graph,
        which doubled the cost of tracing this function (its run time is one
        call in ``stats_every`` steps, and it is nearly always due when called).

        Args:
            step: Scalar int64: the step after the weight snapshot.
            measure: Returns the ``[2, num_layers]`` weight norms and update ratios.
        """
        weight_buf = self.weight_buf
        assert weight_buf is not None, "the ring was built without weight columns"
        recorded = self.recorded.read_value()
        index = tf.math.floormod(recorded - 1, self.capacity)
        run_buf = self.run_buf.read_value()
        weighed = run_buf[index, _WEIGHED]
        due = tf.logical_and(
            recorded > 0,
            tf.logical_and(
                tf.equal(tf.gather(self.step_buf.read_value(), index), step),
                tf.equal(weighed, 0.0),
            ),
        )
        values = tf.where(due, measure(), tf.gather(weight_buf.read_value(), index))
        _write_row(weight_buf, tf.reshape(index, [1, 1]), values[tf.newaxis])
        flag = tf.stack([index, tf.constant(_WEIGHED, tf.int64)])[tf.newaxis]
        self.run_buf.assign(
            tf.tensor_scatter_nd_update(run_buf, flag, tf.where(due, 1.0, weighed)[tf.newaxis])
        )

    def read(self, since: int) -> RingRead:
        """Host side: read the rows written after the first ``since`` (blocks on a device read).

        Steps only go backwards if a checkpoint was restored mid-run: each
        increasing stretch becomes its own batch (the server refuses steps it
        already has).
        """
        count = int(self.recorded.numpy())
        pending = count - since
        if pending <= 0:
            return RingRead(since, 0, [])
        lost = max(0, pending - self.capacity)
        pending -= lost
        rows = np.arange(count - pending, count) % self.capacity
        steps = self.step_buf.numpy()[rows].astype(np.int64)
        run = self.run_buf.numpy()[rows]
        norms = self.norm_buf.numpy()[rows]
        nonfinite = self.nonfinite_buf.numpy()[rows].astype(np.int64)
        weights = None if self.weight_buf is None else self.weight_buf.numpy()[rows]
        breaks = np.flatnonzero(np.diff(steps) <= 0) + 1
        batches = [
            StepBatch(
                layers=self.layout.names,
                step=steps[part],
                loss=run[part, _LOSS].astype(np.float32),
                loss_known=run[part, _LOSS_KNOWN] > 0.5,
                global_norm=run[part, _GLOBAL].astype(np.float32),
                global_norm_clipped=run[part, _GLOBAL_CLIPPED].astype(np.float32),
                clip_coef=run[part, _COEF].astype(np.float32),
                skipped=run[part, _SKIPPED] > 0.5,
                grad_norm=norms[part],
                nonfinite=nonfinite[part],
                learning_rate=run[part, _LR].astype(np.float32),
                loss_scale=run[part, _LOSS_SCALE].astype(np.float32),
                **_weight_columns(weights, run[part, _WEIGHED] > 0.5, part),
            )
            for part in np.split(np.arange(len(steps)), breaks)
        ]
        return RingRead(count, lost, batches)
