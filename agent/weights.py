"""Weight norms and update ratios ‖Δw‖/‖w‖ of a step: every step in-step, or between steps.

Δw of a measured step is the change of the weights over that step: the weights
after its update minus the weights before it. So everything the optimizer
writes counts (update rule, decoupled weight decay, constraints, an EMA
overwrite), a skipped step has Δw = 0 exactly, and nothing depends on how the
optimizer computes its update. w is the weight after the update.

Two ways, by ``stats_every``:

* **Every step** (``stats_every=1``): the train step reads the weights before
  the update (:func:`read_weights`) and measures after it
  (:func:`weight_stats`), with no ``tf.cond`` and no host call. Holding that
  read across the update makes TensorFlow copy each variable on write, which is
  the one copy this costs; under XLA the difference fuses into the update.
  Measured on the benchmark model (6M parameters, 2 CPU cores), this is the
  cheapest exact way: taking Δw from the tensor the optimizer passes to
  ``assign_sub`` saves about 4 ms per step in graph mode but misses decoupled
  weight decay and constraints (written outside it), and saves nothing under
  XLA (the update tensor must then be materialized).
* **Every n-th step** (``stats_every`` > 1): the monitor snapshots the weights
  between two steps (:meth:`WeightSnapshot.take`, 0.4 ms) and, after the next
  one, calls a compiled function that measures them; the train step itself is
  unchanged, so the 49 steps in 50 that are not measured cost nothing. Only with
  ``steps_per_execution`` > 1, where nothing runs between the steps of an
  execution, does the train step measure its first step itself, in a
  ``tf.cond``. Any in-step variant costs on *every* step: a ``tf.cond`` that
  only reads the weights and the snapshot costs ×1.02 (graph and XLA). The
  price is memory: one copy of the trainable weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from .layers import LayerLayout
from .stats import compute_gradient_stats, layer_norms_two_pass

__all__ = ["WeightSnapshot", "read_weights", "update_ratio", "weight_stats"]


def _raw(variable: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (read without autocasting)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def update_ratio(update: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """‖Δw‖/‖w‖ per layer: 0 where nothing changed, +Inf where ‖w‖ = 0 < ‖Δw‖, NaN kept."""
    return tf.where(update == 0.0, tf.zeros_like(update), update / weights)


def read_weights(variables: Sequence[Any]) -> tuple[tf.Tensor, ...]:
    """In-graph (or eager), before the update: the values of ``variables`` now."""
    return tuple(tf.convert_to_tensor(_raw(v)) for v in variables)


def weight_stats(
    weights: Sequence[tf.Tensor], before: Sequence[tf.Tensor], layout: LayerLayout
) -> tf.Tensor:
    """``[2, L]`` per-layer weight norms and update ratios, w = ``weights``, Δw = w − ``before``.

    Norms are float32 and overflow-safe (:func:`~gradwatch.agent.stats.compute_gradient_stats`).
    """
    deltas = [w - b for w, b in zip(weights, before, strict=True)]
    norms = compute_gradient_stats(weights, layout).layer_norms
    updates = compute_gradient_stats(deltas, layout).layer_norms
    return tf.stack([norms, update_ratio(updates, norms)])


class WeightSnapshot(tf.Module):
    """A copy of the trainable weights, and the number of the step it was taken before.

    Create eagerly, under the distribution strategy of the variables (the copy
    is then mirrored like them). Never checkpointed.

    Thread-safety: training thread.
    """

    def __init__(self, variables: Sequence[Any], keys: Sequence[object], step: int) -> None:
        """Copy ``variables`` now, as the snapshot before step ``step``.

        Args:
            variables: The trainable variables (Keras or ``tf.Variable``).
            keys: An identity per variable, to find its copy from any
                reference to it (a replica's or a wrapper's).
            step: Number of the next step.
        """
        super().__init__(name="gradwatch_weights")
        self.strategy = tf.distribute.get_strategy()  # host calls run under its scope
        self._variables = [_raw(v) for v in variables]
        self._copies = [
            tf.Variable(v.read_value(), trainable=False, name="weights_before")
            for v in self._variables
        ]
        self._index = {key: i for i, key in enumerate(keys)}
        self.step = tf.Variable(step, dtype=tf.int64, trainable=False, name="weights_step")
        self._copy = tf.function(self._copy_weights, autograph=False)

    def take(self, step: tf.Variable) -> None:
        """Host side: copy the weights now, before step ``step`` (blocks for one copy)."""
        with self.strategy.scope():
            self._copy(step)

    def _copy_weights(self, step: tf.Variable) -> None:
        for copy, variable in zip(self._copies, self._variables, strict=True):
            copy.assign(variable)  # under tf.distribute: each replica from its own copy
        self.step.assign(step)

    def measure(
        self, variables: Sequence[Any], keys: Sequence[object], layout: LayerLayout
    ) -> tf.Tensor:
        """In-graph, after the update: ``[2, L]`` weight norms and update ratios, Δw = w − snapshot.

        The same values as :func:`weight_stats`, by :func:`layer_norms_two_pass`: a
        measurement between steps (or in a ``tf.cond`` of a step) runs once in
        ``stats_every`` steps, so its graph is kept small rather than its run time.
        """
        before = [tf.convert_to_tensor(self._copies[self._index[key]]) for key in keys]
        weights = read_weights(variables)
        deltas = [w - b for w, b in zip(weights, before, strict=True)]
        # One pass over the weights and the updates together: layers L..2L-1 are the updates.
        both = LayerLayout(
            names=layout.names * 2,
            segment_ids=layout.segment_ids
            + tuple(i + layout.num_layers for i in layout.segment_ids),
        )
        norms, updates = tf.split(layer_norms_two_pass([*weights, *deltas], both), 2)
        return tf.stack([norms, update_ratio(updates, norms)])
