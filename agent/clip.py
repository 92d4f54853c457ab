"""Gradient clipping policies, applied inside the compiled train step.

A policy is a small immutable description (made by a factory such as
:func:`global_norm`) with two methods, the shape of optax's
``GradientTransformation``:

* ``init(variables, layout)`` creates the policy's state as ``tf.Variable``s
  (thresholds too, so changing one never forces a retrace) and returns it;
* ``apply(grads, state, context)`` returns a :class:`ClipResult` using only tf
  ops, so it runs under ``jit_compile=True`` and inside ``tf.function``.

======================  ===============================================================
factory                 rule (norms are L2, accumulated in float32, overflow-safe)
======================  ===============================================================
:func:`by_value`        each element into ``[-limit, limit]``; NaN/Inf elements → 0
:func:`by_norm`         each tensor's norm ≤ ``max_norm``
:func:`global_norm`     the global norm ≤ ``max_norm``
:func:`layer_norm`      each layer's norm (its variables in quadrature) ≤ its limit
:func:`agc`             each output unit: ‖G‖ ≤ clipping · max(‖W‖, eps)
:func:`autoclip`        global norm ≤ p-th percentile of the past finite global norms
:func:`zclip`           global norm clipped when its EMA z-score exceeds a threshold
:func:`skip_nonfinite`  skip the step when any gradient value is NaN/Inf
:func:`skip_spike`      skip the step when norm − mean > sigma · std of a window
:func:`chain`           apply policies in order
======================  ===============================================================

Rules every policy keeps:

* A gradient is never scaled up (every coefficient is ≤ 1).
* A non-finite gradient never reaches the weights through a clip: the scaling
  policies zero it (at their own granularity: element, tensor, unit, layer or
  all), the skip policies skip the step. TensorFlow's own
  ``tf.clip_by_global_norm`` returns all-NaN in that case, which destroys them.
* Adaptive policies (``autoclip``, ``zclip``, ``skip_spike``): a non-finite
  norm never enters their statistics; the threshold of a step is computed from
  the statistics *before* that step's norm (a spike never raises its own
  threshold); a zero spread (constant norms) neither divides by zero nor
  clips; warm-up is an explicit number of finite norms. Their state lives in
  ``tf.Variable``\\s made with :func:`state_variable`, so ``tf.train.Checkpoint``
  restores it and a resumed run continues its thresholds.
* ``clip_coef`` is the global norm after the policy divided by the norm
  before it: 1 when untouched (or when the incoming norm is 0), 0 when the
  step was skipped or the incoming gradient was non-finite.

Skipping a step outright (optimizer state frozen) needs a ``tf.cond`` around
the optimizer update, which under XLA costs a copy of every optimizer
variable (×1.2 per step, measured with ``bench/overhead.py``). So only a policy
whose ``apply`` returns a ``skip`` tensor pays for it; the scaling policies
return ``skip=None`` and are branch-free.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, runtime_checkable

import tensorflow as tf

from gradwatch.agent.config import ConfigError
from gradwatch.agent.layers import LayerLayout
from gradwatch.agent.stats import (
    GradientStats,
    combine_variable_norms,
    compute_gradient_stats,
    dense_gradient,
    safe_norm,
    scale_stats,
)

__all__ = [
    "ClipContext",
    "ClipPolicy",
    "ClipResult",
    "PolicyState",
    "agc",
    "autoclip",
    "by_norm",
    "by_value",
    "chain",
    "global_norm",
    "layer_norm",
    "skip_nonfinite",
    "skip_spike",
    "state_variable",
    "zclip",
]

log = logging.getLogger("gradwatch.agent")


class PolicyState(tf.Module):
    """Holds a policy's ``tf.Variable``s so checkpoints track them.

    Attach variables made with :func:`state_variable` as attributes. Thresholds
    are variables too: ``state.max_norm.assign(0.5)`` changes one between
    steps without retracing.
    """


def state_variable(initial_value: Any, dtype: tf.DType, name: str) -> tf.Variable:
    """Create one variable of policy state.

    Call only from ``ClipPolicy.init``, which the monitor runs eagerly under the
    model's distribution strategy scope: under ``MirroredStrategy`` the variable
    is mirrored, and since every replica computes the same value from the
    all-reduced gradients, writes keep the first replica's value.
    """
    return tf.Variable(
        initial_value,
        dtype=dtype,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


@dataclass(frozen=True, slots=True)
class ClipContext:
    """What a policy may read about the current step (tensors are float32).

    Under ``tf.distribute`` the gradients and statistics are the all-reduced
    (summed) ones, identical on every replica.

    Attributes:
        stats: Norms of the incoming gradients.
        variables: The trainable variables, aligned with the gradients.
        layout: Layer grouping of the variables.
        step: Scalar int64, the step being applied (0-based, continues across
            ``fit`` calls and checkpoint restores).
        skipped: Scalar bool, set by :func:`chain` when an earlier policy of the
            chain skips this step; a stateful policy then leaves its state
            unchanged (a step that is not applied teaches nothing). ``None``
            outside a chain.
    """

    stats: GradientStats
    variables: Sequence[Any]
    layout: LayerLayout
    step: tf.Tensor
    skipped: tf.Tensor | None = None


@dataclass(frozen=True, slots=True)
class ClipResult:
    """Outcome of a policy for one step.

    Attributes:
        grads: Gradients to hand to the optimizer (same structure as given).
        clip_coef: Scalar float32, global norm after / before (1 = untouched,
            0 = zeroed or skipped).
        skip: Scalar bool; when true the optimizer update is not applied. ``None``
            when the policy never skips (no branch in the compiled step).
        stats: Statistics of the returned gradients when the policy can derive
            them cheaply (e.g. :func:`~gradwatch.agent.stats.scale_stats`), or
            ``None`` to have them recomputed (one more pass over the gradients).
    """

    grads: list[Any]
    clip_coef: tf.Tensor
    skip: tf.Tensor | None
    stats: GradientStats | None


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


# -- tf helpers (pure, XLA-safe) --------------------------------------------------------------

# skip_spike: floor on the window's standard deviation, relative to its mean. An exactly
# constant window (σ = 0) would otherwise call any float-rounding increase a spike.
_SPIKE_STD_FLOOR = 1e-3


def _scale(grad: Any, coef: tf.Tensor, finite: tf.Tensor) -> Any:
    """``grad * coef``, or zeros when ``finite`` is false (one fused select under XLA).

    ``coef`` and ``finite`` are scalars, or broadcastable to the gradient (to an
    ``IndexedSlices``' values).
    """
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values
        scaled = tf.where(finite, values * tf.cast(coef, values.dtype), tf.zeros_like(values))
        return tf.IndexedSlices(scaled, grad.indices, grad.dense_shape)
    return tf.where(finite, grad * tf.cast(coef, grad.dtype), tf.zeros_like(grad))


def _keep(grad: Any, keep: tf.Tensor) -> Any:
    """``grad`` where ``keep`` (scalar bool), zeros elsewhere."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values
        kept = tf.where(keep, values, tf.zeros_like(values))
        return tf.IndexedSlices(kept, grad.indices, grad.dense_shape)
    return tf.where(keep, grad, tf.zeros_like(grad))


def _norm_ratio(before: tf.Tensor, after: tf.Tensor) -> tf.Tensor:
    """``clip_coef``: after / before, 1 for a zero gradient, 0 for a non-finite one."""
    ratio = tf.minimum(tf.math.divide_no_nan(after, before), 1.0)
    return tf.where(
        tf.math.is_finite(before), tf.where(before > 0.0, ratio, tf.ones_like(ratio)), 0.0
    )


def _commit(context: ClipContext, ok: tf.Tensor) -> tf.Tensor:
    """Whether a stateful policy may update its state this step."""
    if context.skipped is None:
        return ok
    return tf.logical_and(ok, tf.logical_not(context.skipped))


def _write(buffer: tf.Variable, index: tf.Tensor, value: tf.Tensor, commit: tf.Tensor) -> None:
    """``buffer[index] = value`` if ``commit`` (a whole-buffer assign: mirrored-safe)."""
    old = buffer.read_value()
    new = tf.where(commit, value, tf.gather(old, index))
    buffer.assign(tf.tensor_scatter_nd_update(old, tf.reshape(index, [1, 1]), new[tf.newaxis]))


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


# -- validation -------------------------------------------------------------------------------


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_threshold(name: str, value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_open_unit(name: str, value: object) -> float:
    if not _is_real(value) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name}: expected a number in (0, 1), got {value!r}")
    return float(value)


# -- by_value ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ByValue:
    limit: float

    @property
    def name(self) -> str:
        return "by_value"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="by_value")
        state.limit = state_variable(self.limit, tf.float32, "limit")
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        limit = state.limit.read_value()
        new_grads = [_clip_value(g, limit) for g in grads]
        # Elementwise clipping changes norms in no closed form: one more pass.
        after = compute_gradient_stats(new_grads, context.layout)
        return ClipResult(
            grads=new_grads,
            clip_coef=_norm_ratio(context.stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "limit": self.limit}


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
    return _ByValue(_check_threshold("limit", limit))


# -- by_norm ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ByNorm:
    max_norm: float

    @property
    def name(self) -> str:
        return "by_norm"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="by_norm")
        state.max_norm = state_variable(self.max_norm, tf.float32, "max_norm")
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        stats = context.stats
        max_norm = state.max_norm.read_value()
        norms = stats.variable_norms
        finite = tf.math.is_finite(norms)
        coefs = tf.where(finite, max_norm / tf.maximum(norms, max_norm), 0.0)
        new_grads = [_scale(g, coefs[i], finite[i]) for i, g in enumerate(grads)]
        new_norms = tf.where(finite, tf.minimum(norms, max_norm), 0.0)
        after = combine_variable_norms(new_norms, stats.layer_nonfinite, context.layout)
        return ClipResult(
            grads=new_grads,
            clip_coef=_norm_ratio(stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "max_norm": self.max_norm}


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
    return _ByNorm(_check_threshold("max_norm", max_norm))


# -- global_norm ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _GlobalNorm:
    max_norm: float

    @property
    def name(self) -> str:
        return "global_norm"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="global_norm")
        state.max_norm = state_variable(self.max_norm, tf.float32, "max_norm")
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        norm = context.stats.global_norm
        max_norm = state.max_norm.read_value()
        finite = tf.math.is_finite(norm)
        # max_norm / max(norm, max_norm) is <= 1 by construction: never scales up.
        coef = tf.where(finite, max_norm / tf.maximum(norm, max_norm), 0.0)
        return ClipResult(
            grads=[_scale(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            stats=scale_stats(context.stats, coef),
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


# -- layer_norm -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LayerNorm:
    max_norm: float
    overrides: tuple[tuple[str, float], ...]

    @property
    def name(self) -> str:
        return "layer_norm"

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
        new_grads = [_scale(g, coefs[i], finite[i]) for i, g in enumerate(grads)]
        new_norms = tf.where(finite, stats.variable_norms * coefs, 0.0)
        after = combine_variable_norms(new_norms, stats.layer_nonfinite, context.layout)
        return ClipResult(
            grads=new_grads,
            clip_coef=_norm_ratio(stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "max_norm": self.max_norm, "overrides": dict(self.overrides)}


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
    limit = _check_threshold("max_norm", max_norm)
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
        checked.append((pattern, _check_threshold(f"overrides[{pattern!r}]", value)))
    return _LayerNorm(limit, tuple(checked))


# -- agc --------------------------------------------------------------------------------------


def _unit_norms(x: tf.Tensor) -> tf.Tensor:
    """Norm of each output unit, broadcastable to ``x`` (float32).

    The output unit is the last axis (Keras kernels: Dense ``[in, out]``, Conv
    ``HWIO``), so the norm is over all other axes; a vector or scalar (bias,
    scale) is its own units: ``|x|`` elementwise.
    """
    if x.shape.rank <= 1:
        return tf.abs(tf.cast(x, tf.float32))
    return safe_norm(x, axis=list(range(x.shape.rank - 1)), keepdims=True)


@dataclass(frozen=True, slots=True)
class _Agc:
    clipping: float
    eps: float

    @property
    def name(self) -> str:
        return "agc"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="agc")
        state.clipping = state_variable(self.clipping, tf.float32, "clipping")
        state.eps = state_variable(self.eps, tf.float32, "eps")
        return state

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
            if isinstance(grad, tf.IndexedSlices) and g_units.shape.rank <= 1:
                # Elementwise units of a sparse vector: one coefficient per slice.
                new_grads.append(
                    _scale(grad, tf.gather(coef, grad.indices), tf.gather(finite, grad.indices))
                )
            else:
                new_grads.append(_scale(grad, coef, finite))
            new_norms.append(safe_norm(tf.where(finite, g_units * coef, 0.0)))
        after = combine_variable_norms(
            tf.stack(new_norms), context.stats.layer_nonfinite, context.layout
        )
        return ClipResult(
            grads=new_grads,
            clip_coef=_norm_ratio(context.stats.global_norm, after.global_norm),
            skip=None,
            stats=after,
        )

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "clipping": self.clipping, "eps": self.eps}


def agc(clipping: float = 0.01, eps: float = 1e-3) -> ClipPolicy:
    """Adaptive gradient clipping, unit-wise: ‖G_u‖ ≤ clipping · max(‖W_u‖, eps).

    Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
    Without Normalization" (NFNets), ICML 2021, §4.1; same rule as
    ``optax.adaptive_grad_clip`` (``optax/transforms/_clipping.py``). A unit
    ``u`` is one output unit: for a tensor of rank ≥ 2 the slice at one index
    of the last axis (Dense kernels ``[in, out]``, Conv kernels ``HWIO``), its
    norm taken over all other axes; for a vector or scalar (biases, scales)
    each element is its own unit, compared by ``|·|``. A unit over its limit
    is scaled down to the limit; a unit holding NaN/Inf is zeroed.

    Two differences from optax's defaults, both following "unit = output
    unit": optax takes the whole-vector norm for rank-1 parameters, and for
    rank-3 parameters (multi-head projections) reduces only axis 0. Brock et
    al. also recommend not clipping the final classifier layer; chain or
    choose per model accordingly.

    Args:
        clipping: Largest allowed ratio of gradient norm to weight norm (> 0).
        eps: Floor on the weight norm, so zero-initialised weights can move (> 0).

    Raises:
        ConfigError: An argument is not a finite positive number.
    """
    return _Agc(_check_threshold("clipping", clipping), _check_threshold("eps", eps))


# -- autoclip ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AutoClip:
    percentile: float
    history: int
    warmup_steps: int

    @property
    def name(self) -> str:
        return "autoclip"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="autoclip")
        state.percentile = state_variable(self.percentile, tf.float64, "percentile")
        state.warmup_steps = state_variable(self.warmup_steps, tf.int64, "warmup_steps")
        state.norms = state_variable(tf.zeros([self.history]), tf.float32, "norms")
        state.count = state_variable(0, tf.int64, "count")
        return state

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
        commit = _commit(context, finite)
        _write(state.norms, tf.math.floormod(count, self.history), norm, commit)
        state.count.assign_add(tf.cast(commit, tf.int64))
        return ClipResult(
            grads=[_scale(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            stats=scale_stats(context.stats, coef),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "percentile": self.percentile,
            "history": self.history,
            "warmup_steps": self.warmup_steps,
        }


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
    if not _is_real(percentile) or not 0.0 < float(percentile) <= 100.0:
        raise ConfigError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    return _AutoClip(
        float(percentile),
        _check_int("history", history, 1),
        _check_int("warmup_steps", warmup_steps, 1),
    )


# -- zclip ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ZClip:
    alpha: float
    z_threshold: float
    warmup_steps: int
    eps: float

    @property
    def name(self) -> str:
        return "zclip"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="zclip")
        state.alpha = state_variable(self.alpha, tf.float32, "alpha")
        state.z_threshold = state_variable(self.z_threshold, tf.float32, "z_threshold")
        state.eps = state_variable(self.eps, tf.float32, "eps")
        state.warmup_steps = state_variable(self.warmup_steps, tf.int64, "warmup_steps")
        state.mean = state_variable(0.0, tf.float32, "mean")
        state.var = state_variable(0.0, tf.float32, "var")
        state.count = state_variable(0, tf.int64, "count")
        return state

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
        commit = _commit(context, ok)
        state.mean.assign(tf.where(commit, new_mean, mean))
        state.var.assign(tf.where(commit, new_var, var))
        state.count.assign_add(tf.cast(commit, tf.int64))

        ratio = tf.minimum(tf.math.divide_no_nan(clipped, norm), 1.0)
        coef = tf.where(finite, tf.where(spike, ratio, 1.0), 0.0)
        return ClipResult(
            grads=[_scale(g, coef, finite) for g in grads],
            clip_coef=coef,
            skip=None,
            stats=scale_stats(context.stats, coef),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup_steps": self.warmup_steps,
            "eps": self.eps,
        }


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
        _check_open_unit("alpha", alpha),
        _check_threshold("z_threshold", z_threshold),
        _check_int("warmup_steps", warmup_steps, 1),
        _check_threshold("eps", eps),
    )


# -- skip_nonfinite ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SkipNonfinite:
    max_consecutive: int | None

    @property
    def name(self) -> str:
        return "skip_nonfinite"

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
        commit = _commit(context, tf.constant(True))
        state.consecutive.assign(tf.where(commit, consecutive, old))
        bad = tf.logical_and(commit, tf.logical_not(finite))
        state.total.assign_add(tf.cast(bad, tf.int64))
        coef = tf.where(skip, 0.0, 1.0)
        return ClipResult(
            grads=[_keep(g, tf.logical_not(skip)) for g in grads],
            clip_coef=coef,
            skip=skip,
            stats=scale_stats(context.stats, coef),
        )

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "max_consecutive": self.max_consecutive}


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
        max_consecutive = _check_int("max_consecutive", max_consecutive, 1)
    return _SkipNonfinite(max_consecutive)


# -- skip_spike -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SkipSpike:
    sigma: float
    window: int
    min_history: int

    @property
    def name(self) -> str:
        return "skip_spike"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="skip_spike")
        state.sigma = state_variable(self.sigma, tf.float32, "sigma")
        state.min_history = state_variable(self.min_history, tf.int64, "min_history")
        state.norms = state_variable(tf.zeros([self.window]), tf.float32, "norms")
        state.count = state_variable(0, tf.int64, "count")
        return state

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
        commit = _commit(context, tf.logical_and(finite, tf.math.is_finite(entry)))
        _write(state.norms, tf.math.floormod(count, self.window), entry, commit)
        state.count.assign_add(tf.cast(commit, tf.int64))
        coef = tf.where(skip, 0.0, 1.0)
        return ClipResult(
            grads=[_keep(g, tf.logical_not(skip)) for g in grads],
            clip_coef=coef,
            skip=skip,
            stats=scale_stats(context.stats, coef),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "sigma": self.sigma,
            "window": self.window,
            "min_history": self.min_history,
        }


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
    checked_sigma = _check_threshold("sigma", sigma)
    checked_window = _check_int("window", window, 2)
    checked_min = _check_int("min_history", min_history, 2)
    if checked_min > checked_window:
        raise ConfigError(
            f"min_history: expected at most window ({checked_window}), got {min_history!r}"
        )
    return _SkipSpike(checked_sigma, checked_window, checked_min)


# -- chain ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chain:
    policies: tuple[ClipPolicy, ...]

    @property
    def name(self) -> str:
        return "chain"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="chain")
        state.policies = [policy.init(variables, layout) for policy in self.policies]
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        initial = context.stats.global_norm
        stats = context.stats
        skip: tf.Tensor | None = None
        seen_skip = context.skipped
        product = tf.constant(1.0)
        for policy, policy_state in zip(self.policies, state.policies, strict=True):
            result = policy.apply(
                grads,
                policy_state,
                ClipContext(stats, context.variables, context.layout, context.step, seen_skip),
            )
            grads = result.grads
            stats = (
                result.stats
                if result.stats is not None
                else compute_gradient_stats(grads, context.layout)
            )
            product = product * tf.cast(result.clip_coef, tf.float32)
            if result.skip is not None:
                skip = result.skip if skip is None else tf.logical_or(skip, result.skip)
                seen_skip = (
                    result.skip if seen_skip is None else tf.logical_or(seen_skip, result.skip)
                )
        # Final over initial norm; for a non-finite initial norm the ratio means nothing,
        # and the product of the policies' coefficients says whether anything was zeroed.
        ratio = tf.minimum(tf.math.divide_no_nan(stats.global_norm, initial), 1.0)
        coef = tf.where(
            tf.math.is_finite(initial),
            tf.where(initial > 0.0, ratio, tf.ones_like(ratio)),
            tf.minimum(product, 1.0),
        )
        if skip is not None:
            coef = tf.where(skip, 0.0, coef)
        return ClipResult(grads=grads, clip_coef=coef, skip=skip, stats=stats)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "policies": [p.describe() for p in self.policies]}


def chain(*policies: ClipPolicy) -> ClipPolicy:
    """Apply ``policies`` in order, each to the previous one's output.

    Each policy sees the gradients and statistics the previous one returned.
    ``skip`` is true when any policy skips (``None`` when none can), and after
    a policy skipped the step, the later ones leave their state unchanged. So
    put skip policies first: ``chain(skip_nonfinite(), zclip())`` keeps a NaN
    step out of ZClip's statistics, while a policy *before* a skip has already
    updated its state when the skip is decided. ``clip_coef`` is the final
    global norm over the initial one (1 for a zero gradient, 0 when zeroed or
    skipped). Nested chains are flattened.

    Args:
        *policies: The policies, each at most once (by ``name``).

    Raises:
        ConfigError: ``policies`` is empty, holds something that is not a
            policy, or holds one policy twice.
    """
    flat: list[ClipPolicy] = []
    for policy in policies:
        if isinstance(policy, _Chain):
            flat.extend(policy.policies)
        elif isinstance(policy, ClipPolicy) and not isinstance(policy, type):
            flat.append(policy)
        else:
            raise ConfigError(
                "policies: expected policies from gradwatch.agent.clip "
                f"(e.g. clip.global_norm(1.0)), got {policy!r}"
            )
    if not flat:
        raise ConfigError("policies: expected at least one policy")
    names = [p.name for p in flat]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"policies: each policy may appear once, got {', '.join(duplicates)} twice"
        )
    return _Chain(tuple(flat))
