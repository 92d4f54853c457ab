"""MonitoredOptimizer: the optimizer wrapper that measures and clips every step in-graph.

It follows the pattern of Keras' own ``LossScaleOptimizer``: ``train_step``
calls ``optimizer.apply(grads, variables)`` inside the compiled step, and the
wrapper hands the step to its monitor's
:class:`~gradwatch.agent.recorder.StepRecorder` (statistics, clip policy, ring
row) before the inner optimizer updates the weights, or skips the update. Under
``tf.distribute`` it works on the all-reduced gradient, so N replicas give the
single-device result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from ._keras_compat import apply_accumulating, default_variables, set_untracked
from .config import ConfigError

if TYPE_CHECKING:
    from .monitor import GradientMonitor
    from .recorder import StepRecorder

__all__ = ["MonitoredOptimizer"]


def _all_reduce_sum(replica: Any, grads: list[Any]) -> list[Any]:
    """Sum gradients over replicas (one all-reduce for all of them); ``None`` stays."""
    present = [tf.convert_to_tensor(g) for g in grads if g is not None]
    reduced = iter(replica.all_reduce(tf.distribute.ReduceOp.SUM, present)) if present else iter(())
    return [None if g is None else next(reduced) for g in grads]


def _scale_gradient(grad: Any, factor: float) -> Any:
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * tf.cast(factor, grad.dtype)


@keras.saving.register_keras_serializable(package="gradwatch")
class MonitoredOptimizer(keras.optimizers.Optimizer):  # type: ignore[misc]
    """Wraps an optimizer so every ``apply`` is measured and clipped in-graph.

    Made by :meth:`GradientMonitor.wrap`; follows the pattern of Keras' own
    ``LossScaleOptimizer``. It exposes only the inner optimizer's variables, so
    a checkpoint of the model looks exactly as without gradwatch.
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        monitor: GradientMonitor,
        recorder: StepRecorder,
    ) -> None:
        super().__init__(learning_rate=0.0, name=f"gradwatch_{inner_optimizer.name}")
        self.inner_optimizer = inner_optimizer
        set_untracked(self, "_gradwatch_monitor", monitor)
        set_untracked(self, "_gradwatch_recorder", recorder)

    @property
    def monitor(self) -> GradientMonitor:
        """The monitor that records this optimizer's steps."""
        return self._gradwatch_monitor  # type: ignore[no-any-return]

    def build(self, var_list: Sequence[Any]) -> None:
        """Build the inner optimizer and the monitor's in-graph state (eagerly)."""
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        self._gradwatch_recorder.build(var_list, self.inner_optimizer)
        self.built = True

    @property
    def variables(self) -> list[Any]:
        return list(self.inner_optimizer.variables)

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss: Any) -> Any:
        """Record the step's loss, then let the inner optimizer scale it."""
        self._gradwatch_recorder.record_loss(loss)
        return self.inner_optimizer.scale_loss(loss)

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Measure, clip and apply one step's gradients (runs inside the compiled step).

        Under ``tf.distribute`` the gradients are all-reduced first, so the
        statistics, the policy and the skip decision see the summed gradient and
        N replicas give the single-device result; the inner optimizer then gets
        ``g / N`` per replica, which its own all-reduce sums back to ``g``.

        Raises:
            ConfigError: The inner optimizer accumulates gradients under
                ``tf.distribute`` (Keras itself cannot: its accumulation
                ``tf.cond`` would contain a ``merge_call``).
        """
        if trainable_variables is None:
            trainable_variables = default_variables(self.inner_optimizer)
        variables = list(trainable_variables)
        if not self.built:
            self.build(variables)
        grads = list(grads)
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync if replica is not None else 1
        if self.inner_optimizer.gradient_accumulation_steps:
            if replicas > 1:
                raise ConfigError(
                    "optimizer: gradient_accumulation_steps does not work under tf.distribute"
                )
            self._apply_accumulating(grads, variables)
            return
        if replicas > 1:
            grads = _all_reduce_sum(replica, grads)
        new_grads, skip, row = self._gradwatch_recorder.process(grads, variables)
        self._gradwatch_recorder.before_update(row)
        if replicas > 1:
            new_grads = [_scale_gradient(g, 1.0 / replicas) for g in new_grads]
        if skip is None:
            self.inner_optimizer.apply(new_grads, variables)
        elif replicas > 1:
            # A tf.cond inside the replica function cannot wrap the inner optimizer's own
            # merge_call; decide in cross-replica context, as Keras' LossScaleOptimizer does.
            replica.merge_call(self._apply_unless_skipped, args=(new_grads, variables, skip))
        else:

            def update() -> tf.Tensor:
                self.inner_optimizer.apply(new_grads, variables)
                return tf.constant(True)

            tf.cond(skip, lambda: tf.constant(False), update)
        self._gradwatch_recorder.record_row(row, variables)

    def _apply_unless_skipped(
        self, distribution: Any, grads: list[Any], variables: list[Any], skip: Any
    ) -> None:
        """Cross-replica: apply the per-replica gradients on every replica, or on none."""
        skip_any = distribution.experimental_local_results(skip)[0]  # same on every replica

        def update() -> tf.Tensor:
            distribution.extended.call_for_each_replica(
                self.inner_optimizer.apply, args=(grads, variables)
            )
            return tf.constant(True)

        tf.cond(skip_any, lambda: tf.constant(False), update)

    def _apply_accumulating(self, grads: list[Any], variables: list[Any]) -> None:
        """``gradient_accumulation_steps``: measure and clip the averaged gradient of each update.

        See :func:`~gradwatch.agent._keras_compat.apply_accumulating`.
        """
        recorder = self._gradwatch_recorder

        def process(grads: list[Any], variables: list[Any]) -> tuple[list[Any], Any, Any]:
            # The update step's averaged gradient: captured (incident) before its update.
            new_grads, skip, row = recorder.process(grads, variables)
            recorder.before_update(row)
            return new_grads, skip, row

        apply_accumulating(self.inner_optimizer, grads, variables, process, recorder.record_row)

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        return {"inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None
    ) -> keras.optimizers.Optimizer:
        """Load as the plain inner optimizer: a saved model does not carry its monitor."""
        return keras.saving.deserialize_keras_object(
            config["inner_optimizer"], custom_objects=custom_objects
        )
