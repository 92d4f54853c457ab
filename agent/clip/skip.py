"""Skip policies: ``skip_nonfinite`` and ``skip_spike`` return a ``skip`` tensor.

A skipped step leaves the weights and the optimizer state as they were (the monitor puts a
``tf.cond`` around the update only for policies that can skip).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import tensorflow as tf

from ..config import ConfigError
from ..layers import LayerLayout
from ..stats import (
    scale_stats,
)
from .base import (
    ClipContext,
    ClipPolicy,
    ClipResult,
    DescribedPolicy,
    PolicyState,
    check_int,
    check_threshold,
    keep_grad,
    may_update,
    new_state,
    norm_window,
    push_norm,
    state_variable,
)


def _skip_result(grads: list[Any], skip: tf.Tensor, context: ClipContext) -> ClipResult:
    """Zero gradients, coefficient 0 and the ``skip`` flag when skipping; else unchanged."""
    coef = tf.where(skip, 0.0, 1.0)
    return ClipResult(
        grads=[keep_grad(g, tf.logical_not(skip)) for g in grads],
        clip_coef=coef,
        skip=skip,
        stats=scale_stats(context.stats, coef),
    )


# skip_spike: floor on the window's standard deviation, relative to its mean. An exactly
# constant window (σ = 0) would otherwise call any float-rounding increase a spike.
_SPIKE_STD_FLOOR = 1e-3


# -- skip_nonfinite ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SkipNonfinite(DescribedPolicy):
    max_consecutive: int | None

    name: ClassVar[str] = "skip_nonfinite"
    skips: ClassVar[bool] = True

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="skip_nonfinite")
        limit = -1 if self.max_consecutive is None else self.max_consecutive
        state.max_consecutive = state_variable(limit, tf.int64, "max_consecutive")
        state.consecutive = state_variable(0, tf.int64, "consecutive")
        state.total = state_variable(0, tf.int64, "total")
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        finite = tf.math.is_finite(context.stats.global_norm)
        old = state.consecutive.read_value()
        consecutive = tf.where(finite, tf.zeros_like(old), old + 1)
        limit = state.max_consecutive.read_value()
        give_up = tf.logical_and(limit >= 0, consecutive > limit)
        skip = tf.logical_and(tf.logical_not(finite), tf.logical_not(give_up))
        commit = may_update(context, tf.constant(True))
        state.consecutive.assign(tf.where(commit, consecutive, old))
        bad = tf.logical_and(commit, tf.logical_not(finite))
        state.total.assign_add(tf.cast(bad, tf.int64))
        return _skip_result(grads, skip, context)


def skip_nonfinite(max_consecutive: int | None = None) -> ClipPolicy:
    """Skip the step (no update, optimizer state frozen) when any gradient value is NaN/Inf.

    Semantics of ``optax.apply_if_finite(inner, max_consecutive_errors)``
    (``optax/transforms/_conditionality.py``): a counter of consecutive
    non-finite steps (reset by a finite one, checkpointed) decides; a
    non-finite step is skipped unless the counter, this step included,
    exceeds ``max_consecutive``, in which case the update is applied *as is*
    (NaN and all) — the run gives up skipping and fails loudly instead of
    silently not training. With ``max_consecutive=None`` non-finite steps are
    always skipped. To zero instead of applying NaN after giving up, chain a
    :func:`global_norm` after this policy. ``state.total`` counts every
    non-finite step.

    A skipped step returns zero gradients (``clip_coef`` 0) besides ``skip``,
    so nothing reaches the weights even if the caller applied them.

    Args:
        max_consecutive: Non-finite steps in a row that are skipped before
            giving up (≥ 1), or ``None`` to skip them all.

    Raises:
        ConfigError: ``max_consecutive`` is not ``None`` or an integer ≥ 1.
    """
    if max_consecutive is not None:
        max_consecutive = check_int("max_consecutive", max_consecutive, 1)
    return _SkipNonfinite(max_consecutive)


# -- skip_spike -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SkipSpike(DescribedPolicy):
    sigma: float
    window: int
    min_history: int

    name: ClassVar[str] = "skip_spike"
    skips: ClassVar[bool] = True

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        return new_state(
            self.name,
            sigma=(self.sigma, tf.float32),
            min_history=(self.min_history, tf.int64),
            **norm_window(self.window),
        )

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        norm = context.stats.global_norm
        finite = tf.math.is_finite(norm)
        count = state.count.read_value()
        n = tf.minimum(count, self.window)
        valid = tf.range(self.window, dtype=tf.int64) < n
        values = tf.where(valid, state.norms.read_value(), 0.0)
        # Mean and sample std (n - 1, as OLMo-core) of the window, scaled by its max so
        # squares of huge finite norms cannot overflow.
        scale = tf.reduce_max(values)
        scale = tf.where(scale > 0.0, scale, tf.ones_like(scale))
        x = values / scale
        mean_x = tf.reduce_sum(x) / tf.cast(tf.maximum(n, 1), tf.float32)
        ssq = tf.reduce_sum(tf.where(valid, tf.square(x - mean_x), 0.0))
        var_x = ssq / tf.cast(tf.maximum(n - 1, 1), tf.float32)
        mean = mean_x * scale
        std = tf.maximum(tf.sqrt(var_x) * scale, _SPIKE_STD_FLOOR * mean)
        bound = state.sigma.read_value() * std
        active = count >= tf.maximum(state.min_history.read_value(), 2)
        spike = tf.logical_and(
            tf.logical_and(active, std > 0.0), tf.logical_and(finite, norm - mean > bound)
        )
        skip = tf.logical_or(tf.logical_not(finite), spike)
        # A spike enters the window winsorized to the threshold it failed: it cannot hide
        # the next spike, and a lasting level shift still moves the window within about
        # `window` steps instead of being skipped for ever.
        entry = tf.where(spike, mean + bound, norm)
        commit = may_update(context, tf.logical_and(finite, tf.math.is_finite(entry)))
        push_norm(state, entry, commit)
        return _skip_result(grads, skip, context)


def skip_spike(sigma: float = 6.0, window: int = 128, min_history: int = 64) -> ClipPolicy:
    """Skip the step when the global norm exceeds the recent mean by ``sigma`` std.

    OLMo-core's ``SkipStepOptimizer`` (``olmo_core/optim/skip_step_optimizer.py``,
    defaults ``rolling_interval_length=128``, ``sigma_factor=6``; the loss
    criterion is left out): skip when ``norm − mean > sigma · std``, with the
    mean and sample standard deviation of the previous ``window`` finite
    norms, once ``min_history`` of them were seen (OLMo-core: half the window).
    A NaN/Inf norm is always skipped and never enters the window.

    Decisions where OLMo-core differs or is silent:

    * A skipped spike enters the window *winsorized* to the threshold it failed
      (``mean + sigma · std``), not as its raw value (OLMo-core) and not
      dropped. The raw value would inflate σ so that the next spike passes;
      dropping it would skip every step for ever after a lasting level shift.
      Winsorized, one spike moves the threshold by a bounded amount, and a
      genuine shift is accepted after a number of steps of the order of the
      window.
    * σ has a floor of 1e-3 · mean, so an exactly constant window neither
      divides by zero nor calls float rounding a spike; a window of zero norms
      gives no scale and never skips.

    A skipped step returns zero gradients (``clip_coef`` 0) besides ``skip``.

    Args:
        sigma: Standard deviations above the mean that make a spike (> 0).
        window: Finite norms kept (≥ 2).
        min_history: Finite norms seen before skipping starts (2 ≤ it ≤ ``window``).

    Raises:
        ConfigError: An argument is out of range.
    """
    checked_sigma = check_threshold("sigma", sigma)
    checked_window = check_int("window", window, 2)
    checked_min = check_int("min_history", min_history, 2)
    if checked_min > checked_window:
        raise ConfigError(
            f"min_history: expected at most window ({checked_window}), got {min_history!r}"
        )
    return _SkipSpike(checked_sigma, checked_window, checked_min)
