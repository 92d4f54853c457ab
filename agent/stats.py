"""Gradient statistics computed inside the compiled train step.

Pure TensorFlow ops, XLA-safe, no host sync. Norms are accumulated in float32
whatever the gradient dtype, and are safe against overflow and underflow: the
fast path sums squares directly; only when a sum is non-finite or tiny does a
second pass rescale each tensor by its largest finite magnitude (the approach
of careful BLAS ``nrm2`` implementations), so a float32 gradient with elements
of 1e30 (or 1e-30) still gives its true norm. (Subnormal values, below 1.2e-38, are flushed to
zero by TensorFlow's CPU kernels before any of this sees them.)

The fast path's sum of squares uses the kernel each compiler runs fastest
(:func:`sum_of_squares`; measured on the benchmark model's 100 variables, 6M
float32 values, 2 CPU cores): in graph mode ``L2Loss`` reads each tensor once
where ``reduce_sum(square(x))`` writes and reads a squared copy (1.1–1.6 ms
against 3.6–4.8 ms); under XLA a matrix-vector product with a vector of ones,
which XLA:CPU runs on Eigen's thread pool, where it emits a reduction on one
thread (0.8–1.2 ms against 4.1–5.2 ms).

Each variable's squared norm is kept as a pair ``(scale, ssq)`` with
``norm**2 == scale**2 * ssq`` until the final square root, so sums over layers
and over the model do not overflow either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tensorflow as tf

from . import _keras_compat as compat
from .layers import LayerLayout

__all__ = [
    "GradientStats",
    "combine_variable_norms",
    "compute_gradient_stats",
    "dense_gradient",
    "layer_norms_two_pass",
    "safe_norm",
    "scale_stats",
    "sum_of_squares",
]

# Below this a float32 sum of squares may have lost precision to underflow.
_TINY_SSQ = 1e-30


@dataclass(frozen=True, slots=True)
class GradientStats:
    """Norms of one step's gradients (all float32 tensors).

    Attributes:
        variable_norms: ``[V]`` L2 norm of each variable's gradient.
        layer_norms: ``[L]`` quadrature sum of the layer's variable norms.
        layer_nonfinite: ``[L]`` int32 count of NaN/±Inf gradient values.
        global_norm: scalar L2 norm over every gradient.
    """

    variable_norms: tf.Tensor
    layer_norms: tf.Tensor
    layer_nonfinite: tf.Tensor
    global_norm: tf.Tensor


def dense_gradient(grad: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """Return ``grad`` as a dense float32 tensor.

    ``IndexedSlices`` (embedding gradients) can repeat an index; their values
    must be summed per row before squaring or the norm is wrong, which the
    dense conversion (an unsorted segment sum) does.
    """
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    return tf.cast(grad, tf.float32)


def sum_of_squares(x: tf.Tensor) -> tf.Tensor:
    """Σx² of a float32 tensor, by the fastest kernel for the graph being traced.

    Not overflow-safe (that is :func:`compute_gradient_stats`' job): a sum past
    the float32 range is +Inf. In-graph or eager; no host sync.
    """
    if not compat.in_xla_context():
        return 2.0 * tf.nn.l2_loss(x)  # exact: L2Loss is Σx²/2
    columns = x.shape[-1] if x.shape.rank else None
    if columns is None or columns < 8 or not x.shape.is_fully_defined():
        return tf.reduce_sum(tf.square(x))  # small or dynamic: the dot would not pay
    rows = tf.reshape(tf.square(x), [-1, columns])
    return tf.reduce_sum(tf.matmul(rows, tf.ones([columns, 1], x.dtype)))


def _fast_ssq(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.stack([sum_of_squares(g) for g in grads])


def _careful_parts(grads: Sequence[tf.Tensor]) -> tuple[tf.Tensor, ...]:
    """Scaled sums of squares plus NaN/Inf flags and counts, one pass per tensor.

    Traced on every step's first trace though rarely run, so its graph is kept small: each
    tensor is flattened (a free reshape) so that every reduction shares one axis constant,
    the scalar work is done once over all tensors, and only the passes over values are per
    tensor (11 graph nodes per tensor, down from 27; tracing this branch was the largest
    part of a 50-layer model's first step). The sum of squares runs over every value, the
    non-finite ones too: each finite ``(x/M)²`` is at most 1, so the sum is NaN exactly
    when a value is NaN and +Inf exactly when one is ±Inf and none is NaN, which gives the
    flags without a pass of their own (under XLA: 3 reductions a tensor instead of 5).
    """
    axis = tf.constant([0])
    flats = [tf.reshape(g, [-1]) for g in grads]
    finite = [tf.math.is_finite(g) for g in flats]
    m = tf.maximum(_finite_maxima(flats, finite, axis), 0.0)  # empty: the dtype's lowest
    safe_m = tf.unstack(tf.where(m > 0.0, m, tf.ones_like(m)), num=len(grads))
    ssqs = _scaled_ssqs(flats, safe_m, axis)
    return (
        m,
        ssqs,
        tf.math.is_nan(ssqs),
        tf.math.is_inf(ssqs),
        tf.stack([tf.reduce_sum(tf.cast(tf.logical_not(f), tf.int32), axis) for f in finite]),
    )


def _finite_maxima(
    flats: Sequence[tf.Tensor], finite: Sequence[tf.Tensor], axis: tf.Tensor
) -> tf.Tensor:
    """``[V]`` largest finite magnitude of each flat tensor (of an empty one: the lowest
    float32; ``finite``: each tensor's ``is_finite``, shared with other passes)."""
    zero = tf.constant(0.0)
    return tf.stack(
        [
            tf.reduce_max(tf.where(f, tf.abs(g), zero), axis)
            for f, g in zip(finite, flats, strict=True)
        ]
    )


def _scaled_ssqs(
    flats: Sequence[tf.Tensor], divisors: Sequence[tf.Tensor], axis: tf.Tensor
) -> tf.Tensor:
    """``[V]`` Σ(x/d)² of each flat tensor over all its values, the non-finite ones too: with
    ``d`` at least its largest finite magnitude, NaN exactly when a value is NaN and +Inf
    exactly when one is ±Inf and none is NaN."""
    return tf.stack(
        [tf.reduce_sum(tf.square(g / d), axis) for g, d in zip(flats, divisors, strict=True)]
    )


def _combine(
    scales: tf.Tensor, ssqs: tf.Tensor, segment_ids: tf.Tensor, num_segments: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Combine ``(scale, ssq)`` pairs per segment without overflow."""
    seg_scale = tf.math.unsorted_segment_max(scales, segment_ids, num_segments)
    seg_scale = tf.maximum(seg_scale, 0.0)  # empty segments give the dtype's lowest value
    denom = tf.gather(seg_scale, segment_ids)
    ratio = tf.where(denom > 0.0, scales / tf.where(denom > 0.0, denom, 1.0), 0.0)
    seg_ssq = tf.math.unsorted_segment_sum(tf.square(ratio) * ssqs, segment_ids, num_segments)
    return seg_scale, seg_ssq


def _norms(scale: tf.Tensor, ssq: tf.Tensor, nan: tf.Tensor, inf: tf.Tensor) -> tf.Tensor:
    norm = scale * tf.sqrt(ssq)
    norm = tf.where(inf, tf.constant(float("inf"), tf.float32), norm)
    return tf.where(nan, tf.constant(float("nan"), tf.float32), norm)


def compute_gradient_stats(
    grads: Sequence[tf.Tensor | tf.IndexedSlices | None], layout: LayerLayout
) -> GradientStats:
    """Compute per-variable, per-layer and global gradient norms.

    Args:
        grads: One gradient per variable of ``layout`` (``None`` for a variable
            without a gradient, counted as zero).
        layout: Which layer each variable belongs to.

    Returns:
        The step's statistics; NaN if any value of the group is NaN, +Inf if
        any is infinite, otherwise the exact float32-accumulated norm.
    """
    dense = [tf.zeros([], tf.float32) if g is None else dense_gradient(g) for g in grads]
    num_vars = len(dense)
    fast = _fast_ssq(dense)

    def careful() -> tuple[tf.Tensor, ...]:
        return _careful_parts(dense)

    def quick() -> tuple[tf.Tensor, ...]:
        ones = tf.where(fast > 0.0, tf.ones_like(fast), tf.zeros_like(fast))
        false = tf.zeros([num_vars], tf.bool)
        return ones, fast, false, false, tf.zeros([num_vars], tf.int32)

    # An exact zero may be underflow, so it takes the careful path too (rare outside
    # dead layers); variables without a gradient are known zeros and never do.
    present = tf.constant([g is not None for g in grads], tf.bool)
    total = tf.reduce_sum(fast)
    trouble = tf.logical_or(
        tf.logical_not(tf.math.is_finite(total)),
        tf.reduce_any(tf.logical_and(present, fast < _TINY_SSQ)),
    )
    scales, ssqs, has_nan, has_inf, counts = tf.cond(trouble, careful, quick)

    segment_ids = tf.constant(layout.segment_ids, tf.int32)
    num_layers = layout.num_layers
    layer_scale, layer_ssq = _combine(scales, ssqs, segment_ids, num_layers)
    layer_nan = (
        tf.math.unsorted_segment_max(tf.cast(has_nan, tf.int32), segment_ids, num_layers) > 0
    )
    layer_inf = (
        tf.math.unsorted_segment_max(tf.cast(has_inf, tf.int32), segment_ids, num_layers) > 0
    )
    layer_nonfinite = tf.math.unsorted_segment_sum(counts, segment_ids, num_layers)

    zero_ids = tf.zeros([num_layers], tf.int32)
    global_scale, global_ssq = _combine(layer_scale, layer_ssq, zero_ids, 1)
    return GradientStats(
        variable_norms=_norms(scales, ssqs, has_nan, has_inf),
        layer_norms=_norms(layer_scale, layer_ssq, layer_nan, layer_inf),
        layer_nonfinite=layer_nonfinite,
        global_norm=_norms(
            global_scale[0], global_ssq[0], tf.reduce_any(has_nan), tf.reduce_any(has_inf)
        ),
    )


def scale_stats(stats: GradientStats, coef: tf.Tensor) -> GradientStats:
    """Statistics of the gradients after all of them were multiplied by ``coef``.

    A zero ``coef`` gives zero norms even where the input was NaN/Inf (the
    policies zero such gradients); non-finite counts are those of the input.
    """
    coef = tf.cast(coef, tf.float32)

    def scaled(norms: tf.Tensor) -> tf.Tensor:
        return tf.where(coef > 0.0, norms * coef, tf.zeros_like(norms))

    return GradientStats(
        variable_norms=scaled(stats.variable_norms),
        layer_norms=scaled(stats.layer_norms),
        layer_nonfinite=stats.layer_nonfinite,
        global_norm=scaled(stats.global_norm),
    )


def combine_variable_norms(
    variable_norms: tf.Tensor, layer_nonfinite: tf.Tensor, layout: LayerLayout
) -> GradientStats:
    """Layer and global norms from per-variable norms (quadrature, overflow-safe).

    For policies that rescale each tensor: their new per-variable norms are
    known without another pass over the gradients.
    """
    norms = tf.cast(variable_norms, tf.float32)
    nan = tf.math.is_nan(norms)
    inf = tf.math.is_inf(norms)
    finite_norms = tf.where(tf.logical_or(nan, inf), tf.zeros_like(norms), norms)
    ones = tf.where(finite_norms > 0.0, tf.ones_like(norms), tf.zeros_like(norms))
    segment_ids = tf.constant(layout.segment_ids, tf.int32)
    num_layers = layout.num_layers
    # (scale, ssq) pairs with scale = norm and ssq = 1 keep the sums in range.
    layer_scale, layer_ssq = _combine(finite_norms, ones, segment_ids, num_layers)
    layer_nan = tf.math.unsorted_segment_max(tf.cast(nan, tf.int32), segment_ids, num_layers) > 0
    layer_inf = tf.math.unsorted_segment_max(tf.cast(inf, tf.int32), segment_ids, num_layers) > 0
    global_scale, global_ssq = _combine(layer_scale, layer_ssq, tf.zeros([num_layers], tf.int32), 1)
    return GradientStats(
        variable_norms=norms,
        layer_norms=_norms(layer_scale, layer_ssq, layer_nan, layer_inf),
        layer_nonfinite=layer_nonfinite,
        global_norm=_norms(global_scale[0], global_ssq[0], tf.reduce_any(nan), tf.reduce_any(inf)),
    )


def safe_norm(
    x: tf.Tensor, axis: int | Sequence[int] | None = None, keepdims: bool = False
) -> tf.Tensor:
    """L2 norm of ``x`` along ``axis`` in float32, safe against overflow and underflow.

    Every value is divided by the tensor's largest finite magnitude before
    squaring (one extra reduction), so elements of 1e30 give their true norm.
    A NaN in a slice gives NaN for that slice, an Inf gives +Inf; a slice of
    zeros gives 0.

    Args:
        x: Any real tensor (cast to float32).
        axis: Axes to reduce (``None``: all of them).
        keepdims: Keep the reduced axes with length 1 (for broadcasting back).

    Returns:
        The norms, float32.
    """
    x = tf.cast(x, tf.float32)
    finite_abs = tf.where(tf.math.is_finite(x), tf.abs(x), tf.zeros_like(x))
    scale = tf.reduce_max(finite_abs)
    safe_scale = tf.where(scale > 0.0, scale, tf.ones_like(scale))
    ssq = tf.reduce_sum(tf.square(x / safe_scale), axis=axis, keepdims=keepdims)
    return tf.sqrt(ssq) * safe_scale


def layer_norms_two_pass(tensors: Sequence[tf.Tensor], layout: LayerLayout) -> tf.Tensor:
    """``[L]`` float32 L2 norm per layer of ``tensors``, overflow- and underflow-safe, no branch.

    Two passes over each tensor: the layer's largest finite magnitude M, then Σ(x/M)²,
    so the norm is M·√Σ(x/M)². A NaN gives NaN, an Inf (and no NaN) +Inf, and a layer
    of zeros 0, as :func:`compute_gradient_stats` does. One
    scale per layer is enough: a value too small next to M to survive squaring is too
    small to change the sum. For the measurements between steps, where the size of
    the traced graph matters and the run time does not (one call in ``stats_every``
    steps): no ``tf.cond``, about 9 graph nodes per tensor instead of about 25.
    """
    flat, axis = tf.constant([-1]), tf.constant([0])
    flats = [tf.reshape(tf.cast(t, tf.float32), flat) for t in tensors]
    maxima = _finite_maxima(flats, [tf.math.is_finite(f) for f in flats], axis)
    segment_ids = tf.constant(layout.segment_ids, tf.int32)
    scale = tf.math.unsorted_segment_max(maxima, segment_ids, layout.num_layers)
    # A layer of zeros (or only non-finite values, or no values) is scaled by 1.
    scale = tf.where(scale > 0.0, scale, tf.ones_like(scale))
    divisors = tf.unstack(tf.gather(scale, segment_ids), num=len(flats))
    ssqs = _scaled_ssqs(flats, divisors, axis)
    return scale * tf.sqrt(tf.math.unsorted_segment_sum(ssqs, segment_ids, layout.num_layers))
