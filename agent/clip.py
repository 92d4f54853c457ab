"""Gradient clipping policies, applied inside the compiled train step.

A policy is a small immutable description (made by a factory such as
:func:`global_norm`) with two methods, the shape of optax's
``GradientTransformation``:

* ``init(variables, layout)`` creates the policy's state as ``tf.Variable``s
  (thresholds too, so changing one never forces a retrace) and returns it;
* ``apply(grads, state, context)`` returns a :class:`ClipResult` using only tf
  ops, so it runs under ``jit_compile=True`` and inside ``tf.function``.

Rules every policy keeps: a gradient is never scaled up, and a non-finite
gradient never reaches the weights through a clip (TensorFlow's own
``tf.clip_by_global_norm`` returns all-NaN in that case, which destroys them).

Skipping a step outright (optimizer state frozen) needs a ``tf.cond`` around
the optimizer update, which under XLA costs a copy of every optimizer
variable (×1.2 per step, measured with ``bench/overhead.py``). So only a policy
whose ``apply`` returns a ``skip`` tensor pays for it; the scaling policies
return ``skip=None`` and are branch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import tensorflow as tf

from gradwatch.agent.config import ConfigError
from gradwatch.agent.layers import LayerLayout
from gradwatch.agent.stats import GradientStats

__all__ = ["ClipContext", "ClipPolicy", "ClipResult", "PolicyState", "global_norm"]


class PolicyState(tf.Module):
    """Holds a policy's ``tf.Variable``s so checkpoints track them."""


@dataclass(frozen=True, slots=True)
class ClipContext:
    """What a policy may read about the current step (tensors are float32).

    Attributes:
        stats: Norms of the incoming gradients.
        variables: The trainable variables, aligned with the gradients.
        layout: Layer grouping of the variables.
    """

    stats: GradientStats
    variables: Sequence[Any]
    layout: LayerLayout


@dataclass(frozen=True, slots=True)
class ClipResult:
    """Outcome of a policy for one step.

    Attributes:
        grads: Gradients to hand to the optimizer (same structure as given).
        clip_coef: Scalar float32, global norm after / before (1 = untouched).
        skip: Scalar bool; when true the optimizer update is not applied. ``None``
            when the policy never skips (no branch in the compiled step).
        global_norm: Scalar float32 global norm after the policy, or ``None``
            when the policy cannot derive it and it must be recomputed.
    """

    grads: list[Any]
    clip_coef: tf.Tensor
    skip: tf.Tensor | None
    global_norm: tf.Tensor | None


@runtime_checkable
class ClipPolicy(Protocol):
    """A clipping rule; see the module docstring."""

    @property
    def name(self) -> str:
        """Short identifier, e.g. ``global_norm``."""
        ...

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        """Create the policy's state. Called once, eagerly, under the strategy scope."""
        ...

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        """Clip one step's gradients (tf ops only)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description sent with the run's configuration."""
        ...


def _scale(grad: Any, coef: tf.Tensor, finite: tf.Tensor) -> Any:
    """``grad * coef``, or zeros when ``finite`` is false (one fused select under XLA)."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values
        scaled = tf.where(finite, values * tf.cast(coef, values.dtype), tf.zeros_like(values))
        return tf.IndexedSlices(scaled, grad.indices, grad.dense_shape)
    return tf.where(finite, grad * tf.cast(coef, grad.dtype), tf.zeros_like(grad))


def _check_threshold(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class _GlobalNorm:
    max_norm: float

    @property
    def name(self) -> str:
        return "global_norm"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="global_norm")
        state.max_norm = tf.Variable(
            self.max_norm, dtype=tf.float32, trainable=False, name="max_norm"
        )
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        norm = context.stats.global_norm
        max_norm = state.max_norm
        finite = tf.math.is_finite(norm)
        # max_norm / max(norm, max_norm) is <= 1 by construction: never scales up.
        coef = tf.where(finite, max_norm / tf.maximum(norm, max_norm), 0.0)
        return ClipResult(
            grads=[_scale(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            global_norm=tf.where(finite, tf.minimum(norm, max_norm), 0.0),
        )

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "max_norm": self.max_norm}


def global_norm(max_norm: float) -> ClipPolicy:
    """Scale all gradients by ``max_norm / max(‖g‖, max_norm)``.

    Same rule as ``tf.clip_by_global_norm`` and ``Adam(global_clipnorm=...)``,
    except that when the global norm is NaN or Inf the gradient is replaced by
    zeros (``clip_coef`` 0) instead of turning every weight into NaN. A
    zero gradient still advances the optimizer's moments and step count; to
    skip such steps entirely, chain a ``skip_nonfinite`` policy in front.

    Args:
        max_norm: Largest allowed global L2 norm (> 0).

    Raises:
        ConfigError: ``max_norm`` is not a finite positive number.
    """
    return _GlobalNorm(_check_threshold("max_norm", max_norm))
