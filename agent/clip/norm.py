"""Norm and value clipping: ``by_value``, ``by_norm``, ``global_norm``, ``layer_norm``.

Stateless rules (their only state is the threshold, a variable so it can change without
a retrace); branch-free, ``skip`` is always ``None``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import tensorflow as tf

from ..config import ConfigError
from ..layers import LayerLayout
from ..stats import (
    combine_variable_norms,
    compute_gradient_stats,
    scale_stats,
)
from .base import (
    DESCRIBE,
    ClipContext,
    ClipPolicy,
    ClipResult,
    DescribedPolicy,
    PolicyState,
    check_threshold,
    norm_ratio,
    scale_grad,
    state_variable,
)


def _clip_value(grad: Any, limit: tf.Tensor) -> Any:
    """Elementwise clip into ``[-limit, limit]``; non-finite elements become 0."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return _clip_value_slices(grad, limit)
    lim = tf.cast(limit, grad.dtype)
    return tf.where(tf.math.is_finite(grad), tf.clip_by_value(grad, -lim, lim), tf.zeros_like(grad))


def _clip_value_slices(grad: tf.IndexedSlices, limit: tf.Tensor) -> tf.IndexedSlices:
    """Clip the rows of an ``IndexedSlices`` after merging duplicate indices.

    The optimizer sums slices that share an index, so each element of the
    *summed* row must be in range: the clipped merged row is written at the
    first slice of its index and the other slices become zero.
    """
    values = grad.values
    indices = grad.indices
    merged = tf.convert_to_tensor(grad)  # unsorted segment sum over duplicate indices
    rows = tf.gather(merged, indices)
    positions = tf.range(tf.shape(indices, out_type=indices.dtype)[0], dtype=indices.dtype)
    first = tf.math.unsorted_segment_min(positions, indices, grad.dense_shape[0])
    is_first = tf.equal(tf.gather(first, indices), positions)
    lim = tf.cast(limit, values.dtype)
    clipped = tf.where(
        tf.math.is_finite(rows), tf.clip_by_value(rows, -lim, lim), tf.zeros_like(rows)
    )
    mask = tf.reshape(is_first, [-1] + [1] * (values.shape.rank - 1))
    return tf.IndexedSlices(
        tf.where(mask, clipped, tf.zeros_like(clipped)), indices, grad.dense_shape
    )


# -- by_value ---------------------------------------------------------------------------------


log = logging.getLogger("gradwatch.agent")


@dataclass(frozen=True, slots=True)
class _ByValue(DescribedPolicy):
    limit: float

    name: ClassVar[str] = "by_value"

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        limit = state.limit.read_value()
        new_grads = [_clip_value(g, limit) for g in grads]
        # Elementwise clipping changes norms in no closed form: one more pass.
        after = compute_gradient_stats(new_grads, context.layout)
        return ClipResult(
            grads=new_grads,
            clip_coef=norm_ratio(context.stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )


def by_value(limit: float) -> ClipPolicy:
    """Clip every gradient element into ``[-limit, limit]``.

    Same rule as ``tf.clip_by_value(g, -limit, limit)``, except that NaN and
    ±Inf elements become 0 (TensorFlow passes NaN through). For an
    ``IndexedSlices`` gradient, slices that share an index are summed first, as
    the optimizer would, and the sum is clipped.

    Args:
        limit: Largest allowed magnitude of one element (> 0).

    Raises:
        ConfigError: ``limit`` is not a finite positive number.
    """
    return _ByValue(check_threshold("limit", limit))


# -- by_norm ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ByNorm(DescribedPolicy):
    max_norm: float

    name: ClassVar[str] = "by_norm"

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        stats = context.stats
        max_norm = state.max_norm.read_value()
        norms = stats.variable_norms
        finite = tf.math.is_finite(norms)
        coefs = tf.where(finite, max_norm / tf.maximum(norms, max_norm), 0.0)
        new_grads = [scale_grad(g, coefs[i], finite[i]) for i, g in enumerate(grads)]
        new_norms = tf.where(finite, tf.minimum(norms, max_norm), 0.0)
        after = combine_variable_norms(new_norms, stats.layer_nonfinite, context.layout)
        return ClipResult(
            grads=new_grads,
            clip_coef=norm_ratio(stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )


def by_norm(max_norm: float) -> ClipPolicy:
    """Scale each gradient tensor by ``max_norm / max(‖g‖, max_norm)``.

    Same rule as ``tf.clip_by_norm`` per tensor, but with the overflow-safe
    norms of the step's statistics (``tf.clip_by_norm`` returns zeros for a
    float32 tensor whose elements are 1e20), duplicate ``IndexedSlices``
    indices merged before the norm, and a tensor holding NaN/Inf replaced by
    zeros (the other tensors are clipped as usual).

    Args:
        max_norm: Largest allowed L2 norm of one variable's gradient (> 0).

    Raises:
        ConfigError: ``max_norm`` is not a finite positive number.
    """
    return _ByNorm(check_threshold("max_norm", max_norm))


# -- global_norm ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _GlobalNorm(DescribedPolicy):
    max_norm: float

    name: ClassVar[str] = "global_norm"

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        norm = context.stats.global_norm
        max_norm = state.max_norm.read_value()
        finite = tf.math.is_finite(norm)
        # max_norm / max(norm, max_norm) is <= 1 by construction: never scales up.
        coef = tf.where(finite, max_norm / tf.maximum(norm, max_norm), 0.0)
        return ClipResult(
            grads=[scale_grad(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            stats=scale_stats(context.stats, coef),
        )


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
    return _GlobalNorm(check_threshold("max_norm", max_norm))


# -- layer_norm -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LayerNorm(DescribedPolicy):
    max_norm: float
    overrides: tuple[tuple[str, float], ...] = field(metadata={DESCRIBE: dict})

    name: ClassVar[str] = "layer_norm"

    def limit_for(self, layer: str) -> float:
        """The limit of ``layer``: the first matching override, else ``max_norm``."""
        for pattern, limit in self.overrides:
            if fnmatch.fnmatchcase(layer, pattern):
                return limit
        return self.max_norm

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        for pattern, _ in self.overrides:
            if not any(fnmatch.fnmatchcase(layer, pattern) for layer in layout.names):
                log.warning(
                    "gradwatch: layer_norm override %r matches no layer (layers: %s)",
                    pattern,
                    ", ".join(layout.names),
                )
        state = PolicyState(name="layer_norm")
        limits = [self.limit_for(layer) for layer in layout.names]
        state.limits = state_variable(
            tf.constant(limits, tf.float32, shape=[len(limits)]), tf.float32, "limits"
        )
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        stats = context.stats
        limits = state.limits.read_value()
        layer_norms = stats.layer_norms
        layer_finite = tf.math.is_finite(layer_norms)
        layer_coefs = tf.where(layer_finite, limits / tf.maximum(layer_norms, limits), 0.0)
        segments = tf.constant(context.layout.segment_ids, tf.int32)
        coefs = tf.gather(layer_coefs, segments)
        finite = tf.gather(layer_finite, segments)
        new_grads = [scale_grad(g, coefs[i], finite[i]) for i, g in enumerate(grads)]
        new_norms = tf.where(finite, stats.variable_norms * coefs, 0.0)
        after = combine_variable_norms(new_norms, stats.layer_nonfinite, context.layout)
        return ClipResult(
            grads=new_grads,
            clip_coef=norm_ratio(stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )


def layer_norm(max_norm: float, overrides: Mapping[str, float] | None = None) -> ClipPolicy:
    """Scale each layer's gradients so the layer's norm is at most its limit.

    A layer's norm is the quadrature sum of its trainable variables' gradient
    norms (kernel and bias together); all of its variables are scaled by
    ``limit / max(‖g_layer‖, limit)``. A layer whose gradient holds NaN/Inf is
    zeroed; other layers are clipped as usual.

    Args:
        max_norm: Limit of every layer no override matches (> 0).
        overrides: Layer-name pattern → limit. Patterns are ``fnmatch``
            patterns (case-sensitive; ``*`` also matches ``/``) matched against
            the reported layer names such as ``model/encoder/dense_1``; the
            first matching pattern in the mapping's order wins. A pattern that
            matches no layer is logged as a warning when training starts.

    Raises:
        ConfigError: A limit is not a finite positive number (the message names
            it, e.g. ``overrides['*/embedding']``), or ``overrides`` is not a
            mapping of non-empty strings.
    """
    limit = check_threshold("max_norm", max_norm)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"overrides: expected a mapping of layer-name patterns to limits, got {overrides!r}"
        )
    checked: list[tuple[str, float]] = []
    for pattern, value in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(
                f"overrides: expected non-empty string patterns as keys, got {pattern!r}"
            )
        checked.append((pattern, check_threshold(f"overrides[{pattern!r}]", value)))
    return _LayerNorm(limit, tuple(checked))
