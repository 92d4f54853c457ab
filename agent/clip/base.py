"""The policy contract and what the policies share.

The contract: :class:`ClipPolicy`, :class:`ClipContext`, :class:`ClipResult`,
:class:`PolicyState`.

The shared pieces: :func:`state_variable` for policy state, the tf helpers every policy
uses to scale, zero and keep gradients (pure tf ops, XLA-safe), the validation helpers
the factories raise :class:`~gradwatch.agent.config.ConfigError` with, and
:class:`DescribedPolicy`, which derives ``describe()`` from a policy's dataclass fields.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeGuard, cast, runtime_checkable

import tensorflow as tf

from ..config import ConfigError
from ..layers import LayerLayout
from ..stats import (
    GradientStats,
)


class PolicyState(tf.Module):
    """Holds a policy's ``tf.Variable``s so checkpoints track them.

    Attach variables made with :func:`state_variable` as attributes. Thresholds
    are variables too: ``state.max_norm.assign(0.5)`` changes one between
    steps without retracing.
    """


def state_variable(
    initial_value: Any, dtype: tf.DType, name: str, shape: tf.TensorShape | None = None
) -> tf.Variable:
    """Create one variable of policy state.

    Call only from ``ClipPolicy.init``, which the monitor runs eagerly under the
    model's distribution strategy scope: under ``MirroredStrategy`` the variable
    is mirrored, and since every replica computes the same value from the
    all-reduced gradients, writes keep the first replica's value. The incident
    capture also calls it at a train step's first trace, under ``tf.init_scope``.

    A variable made eagerly is not registered with a ``tf.function`` being traced:
    one that creates variables in its first trace is traced a second time (its
    no-variable-creation variant), and that second trace of the whole train step
    cost about as much as the first (measured: 0.6 s of a 1.4 s first ``fit`` step
    for a two-layer model). Registering would only lift an initializer, and an
    eager variable is already initialized. ``shape``: a less specific shape than the
    initial value's, which assignments may then change (not under XLA).
    """
    return tf.Variable(
        initial_value,
        dtype=dtype,
        shape=shape,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        # Made inside a traced function without tf.init_scope, a variable must be lifted.
        experimental_enable_variable_lifting=not tf.executing_eagerly(),
    )


def new_state(name: str, **variables: tuple[Any, tf.DType]) -> PolicyState:
    """A :class:`PolicyState` named ``name`` with one :func:`state_variable` per keyword.

    Each keyword is ``attribute=(initial_value, dtype)``; the variable is named
    after its attribute. Call only from ``ClipPolicy.init`` (see
    :func:`state_variable`).
    """
    state = PolicyState(name=name)
    for attribute, (initial_value, dtype) in variables.items():
        setattr(state, attribute, state_variable(initial_value, dtype, attribute))
    return state


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


#: ``dataclasses.field`` metadata key: how :meth:`DescribedPolicy.describe` reports a field
#: whose value is not JSON-able as is (default: the value itself).
DESCRIBE = "gradwatch.describe"


def describe_policies(policies: Sequence[ClipPolicy]) -> list[dict[str, Any]]:
    """The descriptions of ``policies``, in order (for a field holding policies)."""
    return [policy.describe() for policy in policies]


class DescribedPolicy:
    """Base of the policy dataclasses: ``describe()`` derived from the dataclass fields.

    The description is ``{"policy": name, <field>: <value>, ...}`` in field order;
    a field whose metadata has :data:`DESCRIBE` is reported through that function
    (``layer_norm``'s override pairs as a dict, ``chain``'s policies as their
    descriptions). Stateless; safe from any thread.
    """

    __slots__ = ()

    name: ClassVar[str]
    """Short name of the policy (unique within a chain); each policy class sets it."""
    skips: ClassVar[bool] = False
    """Whether the policy may skip the update (it belongs first in a ``chain``)."""

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        """State of a fixed-threshold policy: one float32 variable per field, named after it.

        Thresholds live in variables so they can change between steps without a retrace.
        Policies with more state (windows, EMAs, counters) override this.
        """
        fields = dataclasses.fields(cast(Any, self))
        return new_state(
            self.name, **{item.name: (getattr(self, item.name), tf.float32) for item in fields}
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able description sent with the run's configuration (non-blocking)."""
        described: dict[str, Any] = {"policy": self.name}
        for item in dataclasses.fields(cast(Any, self)):
            value = getattr(self, item.name)
            convert = item.metadata.get(DESCRIBE)
            described[item.name] = value if convert is None else convert(value)
        return described


# -- tf helpers (pure, XLA-safe) --------------------------------------------------------------


def scale_grad(grad: Any, coef: tf.Tensor, finite: tf.Tensor) -> Any:
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


def keep_grad(grad: Any, keep: tf.Tensor) -> Any:
    """``grad`` where ``keep`` (scalar bool), zeros elsewhere."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values
        kept = tf.where(keep, values, tf.zeros_like(values))
        return tf.IndexedSlices(kept, grad.indices, grad.dense_shape)
    return tf.where(keep, grad, tf.zeros_like(grad))


def norm_ratio(before: tf.Tensor, after: tf.Tensor) -> tf.Tensor:
    """``clip_coef``: after / before, 1 for a zero gradient, 0 for a non-finite one."""
    ratio = tf.minimum(tf.math.divide_no_nan(after, before), 1.0)
    return tf.where(
        tf.math.is_finite(before), tf.where(before > 0.0, ratio, tf.ones_like(ratio)), 0.0
    )


def may_update(context: ClipContext, ok: tf.Tensor) -> tf.Tensor:
    """Whether a stateful policy may update its state this step."""
    if context.skipped is None:
        return ok
    return tf.logical_and(ok, tf.logical_not(context.skipped))


def write_if(buffer: tf.Variable, index: tf.Tensor, value: tf.Tensor, commit: tf.Tensor) -> None:
    """``buffer[index] = value`` if ``commit`` (a whole-buffer assign: mirrored-safe)."""
    old = buffer.read_value()
    new = tf.where(commit, value, tf.gather(old, index))
    buffer.assign(tf.tensor_scatter_nd_update(old, tf.reshape(index, [1, 1]), new[tf.newaxis]))


def norm_window(size: int) -> dict[str, tuple[Any, tf.DType]]:
    """:func:`new_state` entries of a ring of the last ``size`` norms: ``norms`` and ``count``.

    ``count`` is the number of norms ever pushed; slot ``count % size`` is the next to write.
    """
    return {"norms": (tf.zeros([size]), tf.float32), "count": (0, tf.int64)}


def push_norm(state: PolicyState, value: tf.Tensor, commit: tf.Tensor) -> None:
    """Append ``value`` to the state's :func:`norm_window` if ``commit`` (mirrored-safe)."""
    size = state.norms.shape[0]
    write_if(state.norms, tf.math.floormod(state.count.read_value(), size), value, commit)
    state.count.assign_add(tf.cast(commit, tf.int64))


# -- validation -------------------------------------------------------------------------------


def is_real(value: object) -> TypeGuard[numbers.Real]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_threshold(name: str, value: object) -> float:
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_open_unit(name: str, value: object) -> float:
    if not is_real(value) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name}: expected a number in (0, 1), got {value!r}")
    return float(value)
