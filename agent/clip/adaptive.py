"""Adaptive clipping: ``agc`` (relative to the weights), ``autoclip`` and ``zclip``.

``autoclip`` and ``zclip`` clip relative to the past global norms.

The thresholds of ``autoclip`` and ``zclip`` come from statistics of past finite global
norms held in checkpointed ``tf.Variable``\\s; a step's own norm never raises its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import tensorflow as tf

from ..config import ConfigError
from ..layers import LayerLayout
from ..stats import (
    combine_variable_norms,
    dense_gradient,
    safe_norm,
    scale_stats,
)
from .base import (
    ClipContext,
    ClipPolicy,
    ClipResult,
    DescribedPolicy,
    PolicyState,
    check_int,
    check_open_unit,
    check_threshold,
    is_real,
    may_update,
    new_state,
    norm_ratio,
    norm_window,
    push_norm,
    scale_grad,
)


def _percentile(values: tf.Tensor, count: tf.Tensor, percentile: tf.Tensor) -> tf.Tensor:
    """``np.percentile(values[:count], percentile)`` (method ``"linear"``), in-graph.

    ``values`` is a fixed-size buffer of which the first ``count`` entries are
    valid (``count`` ≥ 1 for a meaningful result). Sorts the whole buffer:
    O(n log n) per call.
    """
    size = values.shape[0]
    valid = tf.range(size, dtype=tf.int64) < count
    ordered = tf.sort(tf.where(valid, values, tf.constant(math.inf, values.dtype)))
    n = tf.maximum(count, 1)
    rank = tf.cast(percentile, tf.float64) / 100.0 * tf.cast(n - 1, tf.float64)
    below = tf.floor(rank)
    lo = tf.cast(below, tf.int64)
    hi = tf.minimum(lo + 1, n - 1)
    t = tf.cast(rank - below, values.dtype)
    a = tf.gather(ordered, lo)
    b = tf.gather(ordered, hi)
    diff = b - a
    # numpy's _lerp: exact at both ends and monotonic.
    return tf.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


# -- agc --------------------------------------------------------------------------------------


def _unit_norms(x: tf.Tensor) -> tf.Tensor:
    """Norm of each output unit, broadcastable to ``x`` (float32).

    The output unit is the last axis (Keras kernels: Dense ``[in, out]``, Conv
    ``HWIO``), so the norm is over all other axes; a vector or scalar (bias,
    scale) is one unit, as in optax's ``unitwise_norm``, timm and the NFNets
    reference code.
    """
    if x.shape.rank <= 1:
        return safe_norm(x)
    return safe_norm(x, axis=list(range(x.shape.rank - 1)), keepdims=True)


@dataclass(frozen=True, slots=True)
class _Agc(DescribedPolicy):
    clipping: float
    eps: float

    name: ClassVar[str] = "agc"

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        clipping = state.clipping.read_value()
        eps = state.eps.read_value()
        new_grads: list[Any] = []
        new_norms: list[tf.Tensor] = []
        for grad, variable in zip(grads, context.variables, strict=True):
            if grad is None:
                new_grads.append(None)
                new_norms.append(tf.zeros([], tf.float32))
                continue
            g_units = _unit_norms(dense_gradient(grad))
            w_units = _unit_norms(tf.convert_to_tensor(variable))
            limit = clipping * tf.maximum(w_units, eps)
            finite = tf.math.is_finite(g_units)
            # g > limit > 0 where the quotient is used: no division by zero.
            coef = tf.where(finite, tf.where(g_units > limit, limit / g_units, 1.0), 0.0)
            new_grads.append(scale_grad(grad, coef, finite))
            new_norms.append(safe_norm(tf.where(finite, g_units * coef, 0.0)))
        after = combine_variable_norms(
            tf.stack(new_norms), context.stats.layer_nonfinite, context.layout
        )
        return ClipResult(
            grads=new_grads,
            clip_coef=norm_ratio(context.stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )


def agc(clipping: float = 0.01, eps: float = 1e-3) -> ClipPolicy:
    """Adaptive gradient clipping, unit-wise: ‖G_u‖ ≤ clipping · max(‖W_u‖, eps).

    Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
    Without Normalization" (NFNets), ICML 2021, §4.1; same rule as
    ``optax.adaptive_grad_clip`` (``optax/transforms/_clipping.py``). A unit
    ``u`` is one output unit: for a tensor of rank ≥ 2 the slice at one index
    of the last axis (Dense kernels ``[in, out]``, Conv kernels ``HWIO``), its
    norm taken over all other axes; a vector or scalar (biases, scales) is one
    unit, as in ``optax.adaptive_grad_clip``, timm and the NFNets reference
    code. A unit over its limit is scaled down to the limit; a unit holding
    NaN/Inf is zeroed.

    One difference from optax: for rank-3 parameters (multi-head
    projections, Keras ``EinsumDense`` kernels) the unit is still the last
    axis, where optax reduces only axis 0. Brock et al. also recommend not
    clipping the final classifier layer; chain or choose per model
    accordingly.

    Args:
        clipping: Largest allowed ratio of gradient norm to weight norm (> 0).
        eps: Floor on the weight norm, so zero-initialised weights can move (> 0).

    Raises:
        ConfigError: An argument is not a finite positive number.
    """
    return _Agc(check_threshold("clipping", clipping), check_threshold("eps", eps))


# -- autoclip ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AutoClip(DescribedPolicy):
    percentile: float
    history: int
    warmup_steps: int

    name: ClassVar[str] = "autoclip"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        return new_state(
            self.name,
            percentile=(self.percentile, tf.float64),
            warmup_steps=(self.warmup_steps, tf.int64),
            **norm_window(self.history),
        )

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        norm = context.stats.global_norm
        finite = tf.math.is_finite(norm)
        count = state.count.read_value()
        history = state.norms.read_value()
        # The threshold comes from the history before this step's norm is added.
        threshold = _percentile(
            history, tf.minimum(count, self.history), state.percentile.read_value()
        )
        warm = count < tf.maximum(state.warmup_steps.read_value(), 1)
        # A zero percentile (that many zero norms) gives no scale: clipping to it would
        # zero every gradient until the zeros leave the history.
        active = tf.logical_and(tf.logical_not(warm), threshold > 0.0)
        clip = tf.logical_and(active, norm > threshold)
        coef = tf.where(finite, tf.where(clip, tf.math.divide_no_nan(threshold, norm), 1.0), 0.0)
        commit = may_update(context, finite)
        push_norm(state, norm, commit)
        return ClipResult(
            grads=[scale_grad(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            stats=scale_stats(context.stats, coef),
        )


def autoclip(percentile: float = 10, history: int = 10_000, warmup_steps: int = 25) -> ClipPolicy:
    """AutoClip: clip the global norm to a percentile of the past global norms.

    Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks", IEEE MLSP 2020, §2: the threshold of step
    t is the ``percentile``-th percentile of the observed (unclipped) global
    norms. As in the paper the history holds the raw norms; unlike the paper's
    code, which appends the current norm before taking the percentile, the
    percentile is over the norms *before* this step (a spike never raises its
    own threshold). The percentile is ``np.percentile``'s default (linear
    interpolation between closest ranks).

    The history is a ring buffer of the last ``history`` finite norms, kept in
    a variable (checkpointed); each step sorts it (O(history · log history)).
    Warm-up: no clipping until ``warmup_steps`` finite norms are recorded.
    A NaN/Inf norm is never recorded, and that step's gradient is zeroed. A
    percentile of 0 (enough zero norms in the history, e.g. batches without
    labels) gives no scale and clips nothing.

    Args:
        percentile: Percentile in (0, 100] (10: clip the 90 % largest norms).
        history: How many past norms are kept (≥ 1).
        warmup_steps: Finite norms recorded before clipping starts (≥ 1).

    Raises:
        ConfigError: An argument is out of range.
    """
    if not is_real(percentile) or not 0.0 < float(percentile) <= 100.0:
        raise ConfigError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    return _AutoClip(
        float(percentile),
        check_int("history", history, 1),
        check_int("warmup_steps", warmup_steps, 1),
    )


# -- zclip ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ZClip(DescribedPolicy):
    alpha: float
    z_threshold: float
    warmup_steps: int
    eps: float

    name: ClassVar[str] = "zclip"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        return new_state(
            self.name,
            alpha=(self.alpha, tf.float32),
            z_threshold=(self.z_threshold, tf.float32),
            eps=(self.eps, tf.float32),
            warmup_steps=(self.warmup_steps, tf.int64),
            mean=(0.0, tf.float32),
            var=(0.0, tf.float32),
            count=(0, tf.int64),
        )

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        norm = context.stats.global_norm
        finite = tf.math.is_finite(norm)
        count = state.count.read_value()
        mean = state.mean.read_value()
        var = state.var.read_value()
        alpha = state.alpha.read_value()
        z_thr = state.z_threshold.read_value()
        warm = count < state.warmup_steps.read_value()

        # Warm-up: mean and (population) variance of the norms so far, by Welford's
        # update, which stays exact for constant norms. At the end of warm-up they are
        # the paper's initialisation from the first warmup_steps norms.
        seen = tf.cast(count, tf.float32)
        delta = norm - mean
        warm_mean = mean + delta / (seen + 1.0)
        warm_var = (var * seen + delta * (norm - warm_mean)) / (seen + 1.0)

        # After warm-up: z-score against the statistics before this step.
        std = tf.sqrt(tf.maximum(var, 0.0))
        z = delta / (std + state.eps.read_value())
        # mean == 0 only after all-zero norms: no scale to clip to (clipping to 0 would
        # zero every later gradient and keep the mean at 0).
        active = tf.logical_and(tf.logical_not(warm), mean > 0.0)
        spike = tf.logical_and(active, z > z_thr)
        safe_z = tf.where(spike, z, tf.ones_like(z))
        # Reciprocal clipping: the further out the spike, the closer to the mean.
        clipped = tf.where(spike, mean + (z_thr * z_thr / safe_z) * std, norm)
        # EMA of the clipped norm (alpha·m + (1-alpha)·x, written to be exact when x == m).
        ema_mean = mean + (1.0 - alpha) * (clipped - mean)
        ema_var = var + (1.0 - alpha) * (tf.square(clipped - ema_mean) - var)

        new_mean = tf.where(warm, warm_mean, ema_mean)
        new_var = tf.where(warm, warm_var, ema_var)
        ok = tf.logical_and(
            finite, tf.logical_and(tf.math.is_finite(new_mean), tf.math.is_finite(new_var))
        )
        commit = may_update(context, ok)
        state.mean.assign(tf.where(commit, new_mean, mean))
        state.var.assign(tf.where(commit, new_var, var))
        state.count.assign_add(tf.cast(commit, tf.int64))

        ratio = tf.minimum(tf.math.divide_no_nan(clipped, norm), 1.0)
        coef = tf.where(finite, tf.where(spike, ratio, 1.0), 0.0)
        return ClipResult(
            grads=[scale_grad(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            stats=scale_stats(context.stats, coef),
        )


def zclip(
    alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6
) -> ClipPolicy:
    """ZClip: clip global-norm spikes detected by an EMA z-score.

    Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training", arXiv:2504.02507 (2025), Algorithm 1, and the authors'
    reference code (github.com/bluorion-com/ZClip, ``zclip/zclip.py``, mode
    ``"zscore"``, ``clip_option="adaptive_scaling"``, ``clip_factor=1``):

    * warm-up: the first ``warmup_steps`` finite norms are not clipped; then
      μ and σ² are their mean and population variance;
    * step t: ``z = (g − μ) / (σ + eps)`` with the statistics of step t−1;
      if ``z > z_threshold`` the norm is clipped to
      ``g* = μ + (z_threshold² / z) · σ`` (reciprocal clipping), else g* = g;
    * ``μ ← α·μ + (1−α)·g*``, then ``σ² ← α·σ² + (1−α)·(g* − μ)²`` with the
      new μ — the EMAs take the *clipped* norm, so a spike barely moves them.

    The reference code's optional ``max_grad_norm`` (a fixed clip during
    warm-up) is not part of the algorithm; chain :func:`global_norm` after
    this policy for a hard cap. A NaN/Inf norm zeroes the gradient and leaves
    μ, σ² and the warm-up count unchanged. With σ = 0 (constant norms) an
    equal norm has z = 0 and is not clipped (a larger one is clipped to μ, as
    in the paper); the EMA update is written ``μ + (1−α)(g* − μ)`` so constant
    norms keep σ exactly 0. One guard the paper lacks: while μ = 0 (every norm
    so far was zero) nothing is clipped, since clipping to 0 would zero every
    later gradient and keep μ at 0 for ever.

    Args:
        alpha: EMA decay in (0, 1).
        z_threshold: z-score above which a norm is clipped (> 0).
        warmup_steps: Finite norms collected before clipping starts (≥ 1).
        eps: Added to σ in the z-score (> 0).

    Raises:
        ConfigError: An argument is out of range.
    """
    return _ZClip(
        check_open_unit("alpha", alpha),
        check_threshold("z_threshold", z_threshold),
        check_int("warmup_steps", warmup_steps, 1),
        check_threshold("eps", eps),
    )
