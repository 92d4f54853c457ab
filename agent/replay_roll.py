"""Rolling a bundle forward (:mod:`.incident_rolling`): from its copy of the state to the bad
step, by the model's own ``train_step`` on the batches kept, as training ran them.

Each step runs under XLA when training did (its rounding and its stateless RNG draws are
XLA's), the run's clip policy (rebuilt from its description, its state restored from the
copy) between the gradients and the model's optimizer, which applies its update; its global
gradient norm (float32, before the policy) is compared with the one recorded during
training, the check that the state the bad step is replayed from is the trained one. A
learning rate assigned between steps (a callback) is given back from the recorded rows; other
changes made between steps outside the graph are not replayed (the norms then differ).

Blocks (runs TensorFlow); not thread-safe (patches the optimizer's ``apply`` on the instance
while it runs). Imports TensorFlow and Keras.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import _keras_compat as compat
from .clip.base import ClipContext, ClipPolicy, PolicyState
from .clip.described import from_description
from .config import ConfigError
from .layers import LayerLayout, layer_paths, layout_of
from .replay_bundle import BundleError, batch_data, read_batch, read_tensor
from .stats import compute_gradient_stats

__all__ = ["RolledForward", "roll_forward"]


@dataclass(frozen=True, slots=True)
class RolledForward:
    """How a rolling bundle's state reached the bad step.

    Attributes:
        from_step: The step the copy of the state began; ``steps``: steps run from it.
        every: Steps between the capture's copies (``incident_snapshot_every``).
        largest_difference: The largest relative difference between a step's replayed and
            recorded global norm (0: equal; ``None``: none recorded to compare with).
    """

    from_step: int
    steps: int
    every: int
    largest_difference: float | None


def roll_forward(model: Any, manifest: dict[str, Any], reader: Any) -> RolledForward:
    """Run the steps between the restored copy and the bad step (the model holds the copy).

    Raises:
        BundleError: The bundle lacks some of those steps' batches.
    """
    spec = manifest["roll_forward"]
    if spec.get("missing"):
        missing = spec["missing"]
        raise BundleError(
            f"the batches of steps {missing[0]}–{missing[-1]} were not kept (a larger batch "
            f"than the first, or a capture re-armed fewer than {spec['every']} steps before): "
            f"the state before step {manifest['step']} cannot be rebuilt"
        )
    rows = manifest.get("recorded", [])
    recorded = {int(row["step"]): row.get("global_norm") for row in rows}
    rates = {int(row["step"]): _number(row.get("learning_rate")) for row in rows}
    variables = list(model.trainable_variables)
    layout = layout_of(
        variables, layer_paths(model, compat.sublayers, compat.variable_key), compat.variable_key
    )
    clip = None
    if manifest.get("policy"):
        clip = _policy(manifest, reader, variables, layout)
    step = _training_step(model, layout, clip, bool(manifest.get("jit_compile")))
    differences: list[float] = []
    for j in range(int(spec["steps"])):
        leaves = read_batch(manifest, reader, f"earlier/{j}/")
        at = int(spec["from_step"]) + j
        _set_learning_rate(model, rates.get(at))
        replayed = step(batch_data(manifest, leaves), at)
        expected = _number(recorded.get(at))
        if expected is not None:
            differences.append(_relative(replayed, expected))
    return RolledForward(
        from_step=int(spec["from_step"]),
        steps=int(spec["steps"]),
        every=int(spec["every"]),
        largest_difference=max(differences) if differences else None,
    )


def _policy(
    manifest: dict[str, Any], reader: Any, variables: list[Any], layout: LayerLayout
) -> tuple[ClipPolicy, PolicyState]:
    """The run's policy and its state as the copy's step began (restored from the bundle)."""
    try:
        policy = from_description(manifest["policy"])
    except ConfigError as error:
        raise BundleError(f"the run's clip policy cannot be rebuilt: {error}") from None
    state = policy.init(variables, layout)
    specs = manifest["roll_forward"].get("policy_state") or []
    held = list(state.variables)
    if len(held) != len(specs):
        raise BundleError(
            f"policy state: the policy has {len(held)} variables, the bundle {len(specs)}: "
            "is --model-fn building the same model?"
        )
    for index, variable in enumerate(held):
        value = read_tensor(reader, "policy_state", index)
        if list(value.shape) != [int(d) for d in variable.shape]:
            raise BundleError(
                f"policy state: {specs[index]['path']} has shape {list(value.shape)} in the "
                f"bundle and {list(variable.shape)} here: is --model-fn building the same model?"
            )
        variable.assign(value)
    return policy, state


def _training_step(
    model: Any,
    layout: LayerLayout,
    clip: tuple[ClipPolicy, PolicyState] | None,
    jit_compile: bool,
) -> Callable[[Any, int], float]:
    """One training step of ``model`` (the policy and the update applied); returns its
    global norm before the policy."""
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    norm = tf.Variable(float("nan"), trainable=False)
    step_now = tf.Variable(0, dtype=tf.int64, trainable=False)
    original = inner.apply

    def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
        # Keras' own name: a LossScaleOptimizer passes it by keyword.
        grads, variables = list(grads), list(trainable_variables or model.trainable_variables)
        stats = compute_gradient_stats(grads, layout)
        norm.assign(stats.global_norm)  # a variable: apply may run in a cond
        if clip is None:
            return original(grads, variables)
        policy, state = clip
        result = policy.apply(
            grads, state, ClipContext(stats, variables, layout, step_now.read_value())
        )
        if result.skip is None:
            return original(result.grads, variables)

        def update() -> tf.Tensor:
            original(result.grads, variables)
            return tf.constant(True)

        return tf.cond(result.skip, lambda: tf.constant(False), update)

    def one_step(data: Any) -> tf.Tensor:
        norm.assign(float("nan"))  # stays NaN on a step a LossScaleOptimizer skips
        model.train_step(data)
        return norm.read_value()

    step = tf.function(one_step, jit_compile=jit_compile)

    def run(data: Any, at: int) -> float:
        step_now.assign(at)
        inner.__dict__["apply"] = apply
        try:
            return float(step(data))
        finally:
            inner.__dict__.pop("apply", None)

    return run


def _set_learning_rate(model: Any, rate: float | None) -> None:
    """Give the optimizer the learning rate a step applied in training, when it is a plain
    variable (a callback such as ``LearningRateScheduler`` assigns it between steps; a
    schedule follows the restored iteration count by itself)."""
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if rate is not None and math.isfinite(rate) and isinstance(inner.learning_rate, keras.Variable):
        inner.learning_rate = rate


def _number(value: Any) -> float | None:
    """A recorded number (a float, or ``"nan"``/``"inf"`` as the manifest writes them)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _relative(replayed: float, recorded: float) -> float:
    if math.isnan(replayed) and math.isnan(recorded):
        return 0.0
    if not (math.isfinite(replayed) and math.isfinite(recorded)):
        return 0.0 if replayed == recorded else math.inf
    return abs(replayed - recorded) / max(abs(recorded), float(np.finfo(np.float32).tiny))


def holding_now(model: Any, inner: Any | None) -> Callable[[], None]:
    """What restores the model's variables (and ``inner``'s) to their values now: the
    restore point of the bad step's replays once rolled forward."""
    variables = [
        *model.trainable_variables,
        *model.non_trainable_variables,
        *([] if inner is None else inner.variables),
    ]
    values = [np.array(v.numpy()) for v in variables]

    def restore() -> None:
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    return restore
