"""The loss of a custom ``train_step``, found without the user's help where Keras allows.

Keras' own ``train_step`` passes the loss through ``optimizer.scale_loss``, where the
wrapper records it. A custom one (keras-io's VAE, a GAN) computes its loss, applies the
gradients, and updates a ``Mean`` metric with it (``self.total_loss_tracker.update_state(
total_loss)``). :class:`LossCapture` shadows, for the duration of ``fit``, the model's
``train_step`` and the ``update_state`` of the model's metrics named ``loss`` or
``total_loss``: when a traced ``train_step`` wrote a row but recorded no loss, the value
last given to such a metric during that trace becomes the row's loss. Anything else (two
losses, as in a GAN) is the user's choice: ``monitor.record_loss(loss)`` in the step.

Shadowing is :func:`gradwatch.agent._keras_compat.shadow` (the instance ``__dict__``, undone
by removing the entry); what it relies on in Keras is listed there. Trace-time only; not
thread-safe (the training thread owns it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _keras_compat as compat
from .recorder import StepRecorder

__all__ = ["LOSS_METRIC_NAMES", "LossCapture"]

LOSS_METRIC_NAMES = ("loss", "total_loss")
"""Names of the metrics whose value is taken as the step's loss."""


class LossCapture:
    """Installs and removes the ``train_step`` and metric hooks of one model.

    With optimizer groups it also advances the run's step once at the end of each
    ``train_step`` that applied a group (:mod:`gradwatch.agent.groups`).

    Args:
        recorders: The monitor's recorders now (its only one, or one per group).
        grouped: Whether the monitor records optimizer groups now.
    """

    def __init__(
        self, recorders: Callable[[], list[StepRecorder]], grouped: Callable[[], bool]
    ) -> None:
        self._recorders = recorders
        self._grouped = grouped
        self._model: Any = None
        self._metrics: list[Any] = []
        self._seen: list[Any] = []  # values given to a loss metric in the current trace
        self._hooked_function: Any = None  # the last train function made with the hooks

    def made_with_hooks(self, train_function: Any) -> bool:
        """Whether ``train_function`` was made while the hooks were in place.

        Keras binds ``self.train_step`` when it makes the train function, so a function
        made before :meth:`install` (by ``fit``, just before ``on_train_begin``) lacks them.
        """
        return train_function is not None and train_function is self._hooked_function

    def remember(self, train_function: Any) -> None:
        """Note that ``train_function`` was made (or kept) with the hooks in place."""
        self._hooked_function = train_function

    def install(self, model: Any) -> None:
        """Hook ``model`` (idempotent for the same model; another model's hooks are removed)."""
        if self._model is model:
            return
        self.uninstall()
        train_step = model.train_step
        recorders, grouped, seen = self._recorders, self._grouped, self._seen

        def captured_train_step(data: Any) -> Any:
            traced = recorders()
            for recorder in traced:
                recorder.traced_loss = recorder.traced_row = False
            seen.clear()
            if traced:  # a run's captures share one copy of the RNG states
                traced[0].incidents.shared.at_step_start(model, data)
            logs = train_step(data)
            wrote = [r for r in traced if r.traced_row]
            if wrote and seen and not any(r.traced_loss for r in traced):
                for recorder in wrote:
                    recorder.record_late_loss(seen[-1])
            if wrote and grouped():
                wrote[0].advance_step()  # one step per train_step, however many groups
            for recorder in wrote:
                recorder.incidents.capture_batch(data)
            return logs

        compat.shadow(model, "train_step", captured_train_step)
        self._model = model
        for metric in _loss_metrics(model):
            compat.shadow(metric, "update_state", _capturing(metric.update_state, seen))
            self._metrics.append(metric)

    @property
    def model(self) -> Any:
        """The model hooked now, or ``None``."""
        return self._model

    def uninstall(self) -> None:
        """Remove the hooks (functions traced meanwhile keep them)."""
        if self._model is not None:
            compat.unshadow(self._model, "train_step")
        for metric in self._metrics:
            compat.unshadow(metric, "update_state")
        self._model = None
        self._metrics = []


def _loss_metrics(model: Any) -> list[Any]:
    try:
        metrics = list(model.metrics)
    except Exception:  # a subclass whose metrics property needs a built model
        return []
    return [m for m in metrics if getattr(m, "name", None) in LOSS_METRIC_NAMES]


def _capturing(update_state: Callable[..., Any], seen: list[Any]) -> Callable[..., Any]:
    def update(values: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(values)
        return update_state(values, *args, **kwargs)

    return update
