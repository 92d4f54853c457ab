"""OptimizerSwap: the callback form with one optimizer, swapped into the model for one ``fit``.

At ``on_train_begin`` it wraps ``model.optimizer`` (or a ``LossScaleOptimizer``'s inner
optimizer), hooks the LSO so overflow steps and the unscaled loss are seen, builds the
wrapper and the ring, and decides whether the train function must be traced again; at
``on_train_end`` it gives the model its optimizer and its plain train function back, and
keeps the traced one for the next ``fit`` of the same model. A model compiled with
``monitor.wrap(...)`` is left as it is, and so is a model whose ``train_step`` applies an
optimizer of its own that the monitor wraps. Host-side, training thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras

from . import _keras_compat as compat
from .config import ConfigError
from .optimizer import MonitoredOptimizer
from .recorder import StepRecorder
from .ring import Ring

__all__ = ["OptimizerSwap"]


@dataclass(frozen=True, slots=True)
class _Installed:
    """An optimizer swap made by the callback, undone at the end of training."""

    owner: Any  # the model, or the LossScaleOptimizer whose inner optimizer was swapped
    attribute: str
    original: Any
    plain_train_function: Any  # the model's train function before the swap (may be None)


@dataclass(frozen=True, slots=True)
class _Traced:
    """A train function traced with the wrapper, reused by the next ``fit`` of the model."""

    model: Any
    train_function: Any
    state: Ring
    weights_in_step: bool


class OptimizerSwap:
    """Puts a monitor's wrapper into a model for the duration of a ``fit``.

    Args:
        monitor: The monitor (to tell its wrappers from another monitor's).
        recorder: The monitor's recorder.
        wrap: The monitor's ``wrap`` (returns its one wrapper).
        wrapper: The monitor's wrapper now, or ``None``.
        record_loss: The monitor's in-graph ``record_loss`` (the LSO's unscaled loss).
    """

    def __init__(
        self,
        monitor: object,
        recorder: StepRecorder,
        wrap: Callable[[Any], MonitoredOptimizer],
        wrapper: Callable[[], MonitoredOptimizer | None],
        record_loss: Callable[[Any], None],
    ) -> None:
        self._monitor = monitor
        self._recorder = recorder
        self._wrap = wrap
        self._wrapper = wrapper
        self._record_loss = record_loss
        self._installed: _Installed | None = None
        self._traced: _Traced | None = None
        self._hooked_lso: Any = None

    def begin_fit(self, model: Any, made_with_hooks: Callable[[Any], bool]) -> None:
        """``on_train_begin``: swap, hook, build, and retrace the train function if needed.

        ``made_with_hooks(train_function)`` says whether a train function already calls
        the ``train_step`` hooks (:mod:`gradwatch.agent.step_loss`); one that does not is
        traced again.

        Raises:
            ConfigError: The model has no optimizer, or another monitor's wrapper.
        """
        own = self._applies_its_own(model)
        swapped = False if own else self._install(model)
        if not own:
            self._hook_loss_scale(model.optimizer)
        recorder = self._recorder
        recorder.steps_per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        wrapper = self._wrapper()
        assert wrapper is not None
        with model.distribute_strategy.scope():
            if not wrapper.built and model.built and not own:
                # An unbuilt model (a subclassed one before its first call) does not know
                # all its variables yet: the wrapper then builds at the first apply.
                wrapper.build(model.trainable_variables)
            grown = recorder.ensure_capacity()
        retrace = recorder.begin_fit()
        traced = self._traced
        if (
            swapped
            and traced is not None
            and traced.model is model
            and traced.state is recorder.ring
            and traced.weights_in_step == recorder.weights_in_step
        ):
            # Same wrapper and buffers as the last fit: reuse its trace instead of retracing.
            model.train_function = traced.train_function
        elif swapped or grown or retrace or not made_with_hooks(model.train_function):
            # Trace again so the train function calls the wrapper, the train_step hooks
            # (gradwatch.agent.step_loss) and the current buffers.
            model.train_function = None
            model.make_train_function()

    def end_fit(self, model: Any) -> None:
        """``on_train_end`` (or ``close`` after a ``fit`` that raised): undo what was swapped."""
        self._unhook_loss_scale()
        installed, self._installed = self._installed, None
        if installed is None:
            return
        setattr(installed.owner, installed.attribute, installed.original)
        ring = self._recorder.ring
        if model is not None and ring is not None:
            self._traced = _Traced(
                model, model.train_function, ring, self._recorder.weights_in_step
            )
            model.train_function = installed.plain_train_function

    def _applies_its_own(self, model: Any) -> bool:
        """Whether the monitor wraps an optimizer other than the model's (a custom train_step
        applying ``self.own_optimizer = monitor.wrap(...)``): then the model's optimizer is
        left alone and the wrapper builds on the variables it is first applied to."""
        wrapper, optimizer = self._wrapper(), model.optimizer
        if wrapper is None or optimizer is None:
            return False
        mine = (wrapper, wrapper.inner_optimizer)
        inner = getattr(optimizer, "inner_optimizer", None)  # a LossScaleOptimizer's
        return optimizer not in mine and inner not in mine

    def _install(self, model: Any) -> bool:
        """Swap the wrapper into ``model`` unless it is there already; True if swapped."""
        optimizer = model.optimizer
        if optimizer is None:
            raise ConfigError("model: compile the model with an optimizer before fit")
        # With a LossScaleOptimizer the wrapper goes inside it (it must see unscaled gradients).
        lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        owner, attribute = (optimizer, "inner_optimizer") if lso else (model, "optimizer")
        current = getattr(owner, attribute)
        if isinstance(current, MonitoredOptimizer):
            self._check_own(current)
            return False
        setattr(owner, attribute, self._wrap(current))
        self._installed = _Installed(owner, attribute, current, model.train_function)
        return True

    def _hook_loss_scale(self, optimizer: Any) -> None:
        """Let the monitor see what a LossScaleOptimizer keeps from the wrapper.

        For the duration of training (see :func:`~gradwatch.agent._keras_compat.hook_loss_scale`),
        overflow steps are recorded as skipped and the unscaled loss every step.
        """
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return
        if self._hooked_lso is optimizer:
            return
        self._unhook_loss_scale()
        compat.hook_loss_scale(optimizer, self._recorder.record_overflow_step, self._record_loss)
        self._hooked_lso = optimizer
        self._recorder.loss_scaler = optimizer

    def _unhook_loss_scale(self) -> None:
        optimizer, self._hooked_lso = self._hooked_lso, None
        if optimizer is not None:
            compat.unhook_loss_scale(optimizer)
            self._recorder.loss_scaler = None

    def _check_own(self, wrapper: MonitoredOptimizer) -> None:
        if wrapper.monitor is not self._monitor:
            raise ConfigError("optimizer: wrapped by a different GradientMonitor")
