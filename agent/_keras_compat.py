"""Every use of private Keras and TensorFlow API in the agent, in one module.

Each helper names the private attribute it touches, why gradwatch needs it and
what it relies on. All were measured on TensorFlow 2.21 / Keras 3.15 (CPU,
graph and XLA) and are covered by ``tests/agent`` (accumulation, mixed
precision, distribute, checkpoint); a Keras upgrade that renames one fails those
tests here rather than somewhere in the monitor.

* ``tf.__internal__.tracking.Trackable`` / ``AutoTrackable`` and
  ``Trackable._track_trackable``: make the monitor a checkpoint dependency, so
  ``tf.train.Checkpoint(model=model, monitor=monitor)`` saves the step counter
  and the policy state (Keras callbacks are not trackable).
* ``object.__setattr__`` on a Keras optimizer: keeps the monitor out of Keras'
  tracking ``__setattr__`` (it would become an optimizer dependency).
* ``_distributed_container`` / ``_unique_id`` of ``tf.Variable``: one identity
  for a variable across replicas and Keras wrappers.
* ``Optimizer._trainable_variables``: what ``apply(grads)`` without variables
  applies to (Keras' own default).
* ``Layer._flatten_layers(include_self=False, recursive=False)``: a layer's
  direct sub-layers in tracking order, to name layers by their path in the
  model's tree (``Model.layers`` is public but only lists a model's own
  layers, not those of a custom layer such as a transformer block).
* ``Optimizer._clip_gradients``, ``_apply_weight_decay``,
  ``_backend_update_step``: shadowed during one trace, so
  ``gradient_accumulation_steps`` is measured and clipped on the averaged
  gradient once per real update, where Keras clips it.
* ``Optimizer._accumulated_gradients`` and ``_get_variable_index``: the sum of a step's
  earlier micro-batch gradients, which ``gradwatch replay`` adds to the replayed last
  micro-batch's gradient (as Keras does) to get the update's averaged gradient back.
* ``tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext``: whether the
  step being traced is compiled by XLA (``jit_compile=True``), to pick the reduction
  kernel XLA:CPU runs fastest (:func:`gradwatch.agent.stats.sum_of_squares`).
* The name ``seed_generator_state`` that ``keras.random.SeedGenerator`` gives its state
  variable: how a model's RNG states are told from its other non-trainable variables
  (batch-norm statistics), so incident capture copies them at the start of every step.
* ``LossScaleOptimizer._stateful_handle_non_finite_grads`` and ``scale_loss``:
  shadowed while training, so overflow steps the LSO skips without calling the
  wrapper are recorded, and the unscaled loss is seen.

Shadowing is done by writing to the instance ``__dict__`` (``vars(obj)``) and
undone by removing the entry, never by patching the class.

Two public-API behaviours the hooks of :mod:`gradwatch.agent.step_loss` rely on are
listed here too: ``Model.make_train_function`` binds ``self.train_step`` when it makes
the function (so the instance attribute must be set before), and a metric's
``update_state`` is looked up on the instance when a ``train_step`` is traced.

At import, :func:`check_keras` compares the installed Keras with the range these were
measured on (:data:`TESTED_KERAS`) and looks for every private attribute; a mismatch is a
warning that names the features it affects. ``tests/compat/test_keras_hooks.py`` checks
that Keras still *calls* each hook, not only that it exists.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

__all__ = [
    "TESTED_KERAS",
    "AutoTrackable",
    "Trackable",
    "accumulated_gradients",
    "apply_accumulating",
    "check_keras",
    "default_variables",
    "hook_loss_scale",
    "in_xla_context",
    "is_seed_state",
    "set_untracked",
    "shadow",
    "sublayers",
    "track",
    "unhook_loss_scale",
    "unshadow",
    "variable_key",
]

Trackable: Any = tf.__internal__.tracking.Trackable
"""Base class of objects ``tf.train.Checkpoint`` can save (not exported by ``tf``)."""

AutoTrackable: Any = tf.__internal__.tracking.AutoTrackable
"""A trackable whose attributes (variables, modules) are its checkpoint dependencies."""

Process = Callable[[list[Any], list[Any]], tuple[list[Any], Any, Any]]
"""``(grads, variables) -> (new grads, skip tensor or None, row)``: measure and clip."""

Record = Callable[[Any, list[Any]], None]
"""``(row, variables) -> None``: write the row after the update."""

_LSO_HOOKS = ("_stateful_handle_non_finite_grads", "scale_loss")

TESTED_KERAS = ((3, 15), (4, 0))
"""Keras versions ``[low, high)`` whose private API this module was measured on."""

_PRIVATE: tuple[tuple[Callable[[], Any], str, str], ...] = (
    (lambda: keras.optimizers.Optimizer, "_clip_gradients", "gradient_accumulation_steps"),
    (lambda: keras.optimizers.Optimizer, "_apply_weight_decay", "gradient_accumulation_steps"),
    (lambda: keras.optimizers.Optimizer, "_backend_update_step", "gradient_accumulation_steps"),
    (
        lambda: keras.optimizers.Optimizer,
        "_get_variable_index",
        "gradwatch replay of a step with gradient_accumulation_steps",
    ),
    (
        lambda: keras.optimizers.LossScaleOptimizer,
        "_stateful_handle_non_finite_grads",
        "mixed precision (overflow steps)",
    ),
    (lambda: keras.layers.Layer, "_flatten_layers", "nested layer names"),
    (lambda: tf.__internal__.tracking.Trackable, "_track_trackable", "checkpoints"),
)


def check_keras(version: str | None = None) -> list[str]:
    """Warn about a Keras outside :data:`TESTED_KERAS` or without a private hook used here.

    Only class attributes can be looked for before use (``_trainable_variables`` is set by
    ``build``); ``tests/compat/test_keras_hooks.py`` covers the rest by behaviour.

    Args:
        version: The Keras version to check (default: the installed one).

    Returns:
        The warnings given (empty when all is as measured).
    """
    version = keras.__version__ if version is None else version
    found: list[str] = []
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    low, high = TESTED_KERAS
    if not low <= numbers < high:
        found.append(
            f"gradwatch: Keras {version} is outside the versions its private hooks were "
            f"measured on ({'.'.join(map(str, low))} to below {'.'.join(map(str, high))}); "
            "if a number looks wrong, run gradwatch's tests/compat against it"
        )
    for owner, name, feature in _PRIVATE:
        if not hasattr(owner(), name):
            found.append(
                f"gradwatch: {owner().__name__}.{name} is gone in Keras {version}: "
                f"monitoring with {feature} will fail"
            )
    for message in found:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return found


def track(owner: Any, child: Any, name: str) -> None:
    """Make ``child`` a checkpoint dependency of the trackable ``owner`` under ``name``."""
    owner._track_trackable(child, name=name)


def set_untracked(obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name`` bypassing Keras' tracking ``__setattr__`` (no dependency is made)."""
    object.__setattr__(obj, name, value)


def variable_key(variable: Any) -> object:
    """Identity of a variable that is the same across replicas and wrappers."""
    value = getattr(variable, "value", variable)  # keras.Variable → tf.Variable
    if hasattr(value, "_distributed_container"):
        value = value._distributed_container()
    return getattr(value, "_unique_id", id(value))


def shadow(obj: Any, name: str, value: Any) -> None:
    """Shadow ``obj.name`` on the instance only (its class and other instances keep theirs)."""
    vars(obj)[name] = value


def unshadow(obj: Any, name: str) -> None:
    """Undo :func:`shadow` (no-op when ``obj.name`` is not shadowed)."""
    vars(obj).pop(name, None)


def sublayers(layer: Any) -> list[Any]:
    """A Keras layer's direct sub-layers, in tracking order (empty for a leaf layer)."""
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    return list(flatten(include_self=False, recursive=False))


def in_xla_context() -> bool:
    """Trace time: whether the graph being built is compiled by XLA (False when eager)."""
    try:  # private: TF has no public query; without it the graph-mode kernel is used
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow that moved it
        return False
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def is_seed_state(variable: Any) -> bool:
    """Whether a non-trainable variable is a ``keras.random.SeedGenerator``'s state (the
    seed each draw of Dropout, a noise layer or ``keras.random.*(seed=generator)`` uses)."""
    name = str(getattr(variable, "name", ""))
    return name.rsplit("/", 1)[-1].split(":")[0] == "seed_generator_state"


def default_variables(optimizer: Any) -> list[Any]:
    """The variables ``optimizer.apply(grads)`` updates when given none (Keras' default)."""
    return list(optimizer._trainable_variables)


def apply_accumulating(
    inner: Any, grads: list[Any], variables: list[Any], process: Process, record: Record
) -> None:
    """``inner.apply`` with ``gradient_accumulation_steps``, measured on each real update.

    Keras adds each micro-batch's gradient to its accumulators and, on every
    n-th call, averages them and clips the average inside its own ``tf.cond``.
    This runs ``process`` and ``record`` at that same point, once per real
    update, by shadowing three of ``inner``'s methods while this call traces
    it: the Keras clipping (``_clip_gradients``) and the decoupled weight decay
    (``_apply_weight_decay``) are deferred to the update
    (``_backend_update_step``), which runs ``process`` first and skips all three
    together when it returns a true skip tensor (the accumulators are reset and
    ``iterations`` advances either way, as Keras does). In-graph; not
    thread-safe (the shadowing lasts for this call).
    """
    clip_gradients = inner._clip_gradients
    apply_weight_decay = inner._apply_weight_decay
    update_step = inner._backend_update_step
    decayed: list[Any] = []

    def update_averaged(averaged: Any, trainable: Any, learning_rate: Any) -> None:
        trainable = list(trainable)
        new_grads, skip, row = process(list(averaged), trainable)
        new_grads = clip_gradients(new_grads)

        def update() -> tf.Tensor:
            for decay_variables in decayed:
                apply_weight_decay(decay_variables)
            update_step(new_grads, trainable, learning_rate)
            return tf.constant(True)

        if skip is None:
            update()
        else:
            tf.cond(skip, lambda: tf.constant(False), update)
        record(row, trainable)

    hooks: dict[str, Callable[..., Any]] = {
        "_clip_gradients": lambda averaged: averaged,
        "_apply_weight_decay": decayed.append,
        "_backend_update_step": update_averaged,
    }
    vars(inner).update(hooks)
    try:
        inner.apply(grads, variables)
    finally:
        for name in hooks:
            vars(inner).pop(name, None)


def accumulated_gradients(optimizer: Any, variables: list[Any]) -> list[Any] | None:
    """The gradient accumulators of ``variables`` (built ``optimizer`` with
    ``gradient_accumulation_steps``), in their order; ``None`` without accumulation.

    At an update step they hold the sum of the earlier micro-batches' gradients; Keras
    averages ``(g + accumulator) / steps`` with the last micro-batch's ``g``.
    """
    if not optimizer.gradient_accumulation_steps:
        return None
    accumulators = optimizer._accumulated_gradients
    return [accumulators[optimizer._get_variable_index(v)] for v in variables]


def hook_loss_scale(
    optimizer: Any, on_overflow: Callable[[], None], on_loss: Callable[[Any], None]
) -> None:
    """Let the monitor see what a ``LossScaleOptimizer`` keeps from the wrapper.

    The LSO skips an overflow step without calling the wrapper, and scales the
    loss without calling the inner optimizer's ``scale_loss``. Its two methods
    are shadowed on the instance until :func:`unhook_loss_scale` (functions
    traced meanwhile keep the hooks): ``on_overflow()`` runs in-graph on an
    overflow step, ``on_loss(loss)`` with the unscaled loss of every step.
    """
    handle_non_finite = optimizer._stateful_handle_non_finite_grads
    scale_loss = optimizer.scale_loss

    def hooked_handle_non_finite() -> Any:
        on_overflow()
        return handle_non_finite()

    def hooked_scale_loss(loss: Any) -> Any:
        on_loss(loss)
        return scale_loss(loss)

    vars(optimizer)["_stateful_handle_non_finite_grads"] = hooked_handle_non_finite
    vars(optimizer)["scale_loss"] = hooked_scale_loss


def unhook_loss_scale(optimizer: Any) -> None:
    """Undo :func:`hook_loss_scale` (no-op for an optimizer that was not hooked)."""
    for name in _LSO_HOOKS:
        vars(optimizer).pop(name, None)


check_keras()
