"""The loss of a custom ``train_step``, found without the user's help where Keras allows.

Keras' own ``train_step`` passes the loss through ``optimizer.scale_loss``, where the
wrapper records it. A custom one (keras-io's VAE, a GAN) computes its loss, applies the
gradients, and updates a ``Mean`` metric with it (``self.total_loss_tracker.update_state(
total_loss)``). :class:`LossCapture` shadows, for the duration of ``fit``, the model's
``train_step`` and the ``update_state`` of the model's metrics named ``loss`` or
``total_loss``: when a traced ``train_step`` wrote a row but recorded no loss, the value
last given to such a metric during that trace becomes the row's loss. Anything else (two
losses, as in a GAN) is the user's choice: ``monitor.record_loss(loss)`` in the step.

Shadowing writes to the instance ``__dict__`` and is undone by removing the entry, as in
:mod:`gradwatch.agent._keras_compat`. Trace-time only; not thread-safe (the training
thread owns it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .recorder import StepRecorder

__all__ = ["LOSS_METRIC_NAMES", "LossCapture"]

LOSS_METRIC_NAMES = ("loss", "total_loss")
"""Names of the metrics whose value is taken as the step's loss."""


class LossCapture:
    """Installs and removes the ``train_step`` and metric hooks of one model.

    Args:
        recorder: The monitor's recorder (its trace-time flags and ``record_late_loss``).
    """

    def __init__(self, recorder: StepRecorder) -> None:
        self._recorder = recorder
        self._model: Any = None
        self._metrics: list[Any] = []
        self._seen: list[Any] = []  # values given to a loss metric in the current trace

    def install(self, model: Any) -> None:
        """Hook ``model`` (idempotent for the same model; another model's hooks are removed)."""
        if self._model is model:
            return
        self.uninstall()
        train_step = model.train_step
        recorder, seen = self._recorder, self._seen

        def captured_train_step(data: Any) -> Any:
            recorder.traced_loss = recorder.traced_row = False
            seen.clear()
            logs = train_step(data)
            if recorder.traced_row and not recorder.traced_loss and seen:
                recorder.record_late_loss(seen[-1])
            return logs

        vars(model)["train_step"] = captured_train_step
        self._model = model
        for metric in _loss_metrics(model):
            vars(metric)["update_state"] = _capturing(metric.update_state, seen)
            self._metrics.append(metric)

    def uninstall(self) -> None:
        """Remove the hooks (functions traced meanwhile keep them)."""
        if self._model is not None:
            vars(self._model).pop("train_step", None)
        for metric in self._metrics:
            vars(metric).pop("update_state", None)
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
