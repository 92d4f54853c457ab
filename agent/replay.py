"""Replay an incident bundle (:mod:`gradwatch.agent.incident`): the bad step, run again.

:func:`replay` rebuilds the model (the user's ``model_fn``, else the model JSON the bundle
holds), restores the weights and optimizer state from just before the step, and runs the
model's own ``train_step`` on the captured batch three ways, eagerly, without ever updating
a weight (the optimizer's ``apply`` is intercepted):

1. plain: the gradients, per-layer norms in float32 and recomputed in float64 from the same
   gradients, next to the norms recorded during training;
2. under ``tf.debugging.enable_check_numerics``: the first operation whose output holds a
   NaN/±Inf, the layer whose ``call`` was running, and the innermost frame of the user's code;
3. the remedies: the replayed gradient after ``global_norm``, ``by_value`` and ``zclip`` at the
   run's thresholds (its policy's when it had one, else from the recorded norms), finite or not.

A rolling bundle (captured under XLA, :mod:`.incident_rolling`) holds a copy of the state from
a few steps before; those steps are run again first (:mod:`.replay_roll`).

A step captured on several ``tf.distribute`` replicas is run shard by shard (each replica's
part of the global batch, from the same restored RNG states) and the shards' gradients are
averaged, as the all-reduce did.

A step that averaged ``n`` micro-batches (``gradient_accumulation_steps``) is replayed from
its last micro-batch, whose gradient is added to the restored sum of the others' (the
optimizer's accumulators) and divided by ``n``, as Keras does; a NaN/±Inf already in that
sum is reported by layer (the earlier micro-batches are not in the bundle).

Blocks (runs TensorFlow eagerly); not thread-safe (enables check_numerics process-wide while
it runs). Imports TensorFlow and Keras.
"""

from __future__ import annotations

import math
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import _keras_compat as compat
from .remedies import Remedy, remedies
from .replay_bundle import (
    BundleError,
    RecordedNames,
    batch_data,
    build_model,
    compile_from_manifest,
    input_names,
    open_bundle,
    read_batch,
    replica_shards,
    restorer,
)
from .replay_roll import RolledForward, holding_now, roll_forward

__all__ = ["BundleError", "FirstBadOp", "LayerNorms", "Remedy", "ReplayReport", "replay"]


@dataclass(frozen=True, slots=True)
class FirstBadOp:
    """Where the first NaN/±Inf appeared when the step ran again.

    Attributes:
        op: The operation's type (``Log``, ``MatMul``).
        layer: Path of the innermost Keras layer whose ``call`` was running, or None.
        frame: ``file:line in function`` of the innermost frame of the user's code, or None.
        code: That line's source text, or None.
        message: TensorFlow's first line about it.
    """

    op: str
    layer: str | None
    frame: str | None
    code: str | None
    message: str


@dataclass(frozen=True, slots=True)
class LayerNorms:
    """One layer's gradient L2 norm: replayed (float32, float64) and recorded; its count of
    non-finite values and its largest finite magnitude (``max_abs``, 0 when none is)."""

    layer: str
    replayed: float
    replayed_float64: float
    recorded: float | None
    nonfinite: int
    max_abs: float = 0.0


@dataclass(slots=True)
class ReplayReport:
    """What :func:`replay` found (see the module docstring)."""

    bundle: Path
    step: int
    cause: str
    reproduced: bool
    global_norm: float
    recorded_global_norm: float | None
    layers: list[LayerNorms] = field(default_factory=list)
    first_bad_op: FirstBadOp | None = None
    remedies: list[Remedy] = field(default_factory=list)
    batch_nonfinite: dict[str, int] = field(default_factory=dict)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)  # (step, rate) recorded
    loss_scale: list[tuple[int, float]] = field(default_factory=list)  # (step, scale) recorded
    position: dict[str, int] | None = None  # epoch and step in it (fit only)
    group: str | None = None  # the optimizer group whose step it was
    replicas: int = 1  # the tf.distribute replicas the step ran on (the batch is global)
    sharded: bool = False  # replayed shard by shard (the replicas' own batches), averaged
    accumulation_steps: int | None = None  # micro-batches averaged (the bundle holds the last)
    # NaN/±Inf values, by layer, in the gradient sum of the step's earlier micro-batches.
    accumulated_nonfinite: dict[str, int] = field(default_factory=dict)
    rolled: RolledForward | None = None  # a rolling bundle's steps run before the bad one


def replay(bundle: Path, model_fn: str | None = None) -> ReplayReport:
    """Run a bundle's step again (see the module docstring). Blocks.

    Args:
        bundle: The bundle's directory (holding ``manifest.json``).
        model_fn: ``module:function`` returning the model (built or not, compiled or not);
            needed when the model has custom layers or cannot be rebuilt from its JSON.

    Raises:
        BundleError: An unreadable bundle, a model that cannot be rebuilt, or variables that
            do not match the bundle's.
    """
    manifest, reader = open_bundle(bundle)
    model = build_model(manifest, model_fn)
    leaves = read_batch(manifest, reader)
    data = batch_data(manifest, leaves)  # as fit gave it: (x, y), a bare x, dicts of inputs
    x = keras.utils.unpack_x_y_sample_weight(data)[0]
    if not model.built:
        model(x)
    group = manifest.get("group_variables")  # a GAN's group: its own apply is the step's
    if not getattr(model, "compiled", False) or (model.optimizer is None and group is None):
        compile_from_manifest(model, manifest)
    inner = None
    if group is None:  # a group's optimizer is not known by name: its state is not restored
        lso = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        if lso and not model.optimizer.built:  # its scale (restored below) and its inner
            model.optimizer.build(model.trainable_variables)
        inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
        if not inner.built:
            inner.build(model.trainable_variables)
    restore = restorer(model, inner, manifest, reader)
    names = RecordedNames(model.trainable_variables, manifest["weights"])
    select = _Selection(names, group)
    rolled = None
    if manifest.get("roll_forward"):  # a copy from before the step, and the batches since
        restore()
        rolled = roll_forward(model, manifest, reader)
        restore = holding_now(model, inner)

    restore()
    replicas = int(manifest.get("replicas") or 1)
    shards = replica_shards(data, replicas)
    jit_compile = bool(manifest.get("jit_compile"))
    if shards is None:
        grads, variables = _gradients(model, data, select, jit_compile)
    else:
        grads, variables = _averaged_gradients(model, shards, select, jit_compile, restore)
    steps = manifest.get("gradient_accumulation_steps")
    sums = _accumulators(inner, variables) if steps else None
    if sums is not None:  # as Keras averages: (the last micro-batch's + the others') / n
        grads = [
            None if g is None else (g + total) / np.float32(steps)
            for g, total in zip(grads, sums, strict=True)
        ]
    report = _compare(bundle, manifest, grads, variables, names)
    report.accumulation_steps = steps
    report.rolled = rolled
    if sums is not None:
        report.accumulated_nonfinite = _nonfinite_by_layer(sums, variables, names)
    restore()
    # The global batch, even when sharded above: a replica's backward pass ran on loss ÷
    # replicas, which one device's shard would not reproduce (under a LossScaleOptimizer its
    # float16 gradient could overflow where the replica's did not).
    report.first_bad_op = _first_bad_op(model, data, select)
    report.remedies = remedies(manifest, grads)
    report.batch_nonfinite = _nonfinite_inputs(manifest, leaves)
    report.position = manifest.get("position")
    report.group = manifest.get("group")
    report.replicas = replicas
    report.sharded = shards is not None
    rows = manifest.get("recorded", [])
    for name in ("learning_rate", "loss_scale"):
        history = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) is not None]
        setattr(report, name, history)
    return report


def _accumulators(inner: Any, variables: list[Any]) -> list[np.ndarray]:
    """For a step that averaged micro-batches: the restored sum of the earlier micro-batches'
    gradients (the optimizer's accumulators), one per variable.

    Raises:
        BundleError: The replayed optimizer does not accumulate (or is a group's, whose
            state is not restored).
    """
    found = None if inner is None else compat.accumulated_gradients(inner, variables)
    if found is None:
        raise BundleError(
            "the step averaged several micro-batches (gradient_accumulation_steps) but the "
            "replayed optimizer does not accumulate: is --model-fn compiling the same optimizer?"
        )
    return [np.asarray(total) for total in found]


def _nonfinite_by_layer(
    sums: list[np.ndarray], variables: list[Any], names: RecordedNames
) -> dict[str, int]:
    """NaN/±Inf values in ``sums`` (the earlier micro-batches' gradients), by layer."""
    found: dict[str, int] = {}
    for variable, total in zip(variables, sums, strict=True):
        count = int(total.size - np.count_nonzero(np.isfinite(total)))
        if count:
            layer = names.layer_of(variable)
            found[layer] = found.get(layer, 0) + count
    return found


def _nonfinite_inputs(manifest: dict[str, Any], data: tuple[Any, ...]) -> dict[str, int]:
    """NaN/±Inf values in the captured batch itself, by input (``x``, ``y``, ...)."""
    names = input_names(manifest)
    found = {}
    for index, leaf in enumerate(data):
        array = np.asarray(leaf)
        if array.dtype.kind == "f":
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            if count:
                found[names[index] if index < len(names) else f"input {index}"] = count
    return found


# -- running the step --------------------------------------------------------------------------


def _optimizers(model: Any) -> list[Any]:
    """Every optimizer a ``train_step`` may apply: the model's, and any optimizer attribute
    (a GAN's ``d_optimizer``), with the inner optimizer of a ``LossScaleOptimizer``."""
    found = [model.optimizer, *vars(model).values()]
    optimizers = [o for o in found if isinstance(o, keras.optimizers.Optimizer)]
    inner = [getattr(o, "inner_optimizer", None) for o in optimizers]
    unique = {id(o): o for o in [*optimizers, *inner] if o is not None}
    return list(unique.values())


@dataclass(frozen=True, slots=True)
class _Selection:
    """Which ``apply`` of a ``train_step`` was the bundle's: the last, or for an optimizer
    group (a GAN's part) the one of the group's variables, by their recorded paths."""

    names: RecordedNames
    group: list[str] | None


def _intercepted_step(model: Any, data: tuple[Any, ...], select: _Selection) -> list[Any]:
    """Run ``model.train_step(data)``; return the (grads, variables) that reached ``apply``
    (nothing is applied): the one ``select`` picks."""
    seen: list[Any] = []

    def intercept(target: Any) -> Callable[..., None]:
        # A LossScaleOptimizer is given the scaled gradient: unscale it as its apply would.
        lso = isinstance(target, keras.optimizers.LossScaleOptimizer)
        scale = target.dynamic_scale if lso else None

        def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
            # Keras' own name: a LossScaleOptimizer passes it by keyword.
            found = list(grads)
            if scale is not None:
                found = [None if g is None else g / tf.cast(scale, g.dtype) for g in found]
            seen.append((found, list(trainable_variables or model.trainable_variables)))

        return apply

    targets = _optimizers(model)
    for target in targets:
        target.__dict__["apply"] = intercept(target)
    try:
        model.train_step(data)
    finally:
        for target in targets:
            target.__dict__.pop("apply", None)
    group = select.group
    if group is not None:
        seen = [item for item in seen if [select.names.variable(v) for v in item[1]] == group]
    if not seen:
        which = "" if group is None else " to the captured group's variables"
        raise BundleError(f"the model's train_step applied no gradients{which}")
    return seen[-1]  # type: ignore[no-any-return]


def _gradients(
    model: Any, data: tuple[Any, ...], select: _Selection, jit_compile: bool
) -> tuple[list[Any], list[Any]]:
    """The step's gradients as NumPy arrays, and their variables. A step trained under XLA
    is replayed under XLA: its stateless RNG (dropout masks) draws differently from the
    eager kernels', and its float rounding may differ too."""
    if not jit_compile:
        grads, variables = _intercepted_step(model, data, select)
        return [None if g is None else np.asarray(g) for g in grads], variables
    found: list[Any] = []

    def step(batch: Any) -> list[Any]:
        grads, variables = _intercepted_step(model, batch, select)
        found[:] = [variables, [g is not None for g in grads]]
        return [g for g in grads if g is not None]

    computed = iter(tf.function(step, jit_compile=True)(data))
    variables, present = found
    return [np.asarray(next(computed)) if p else None for p in present], variables


def _averaged_gradients(
    model: Any,
    shards: list[Any],
    select: _Selection,
    jit_compile: bool,
    restore: Callable[[], None],
) -> tuple[list[Any], list[Any]]:
    """The step as ``tf.distribute`` ran it: each shard's gradient from the captured state
    (its RNG states too, which every replica drew its own shard's dropout masks from), then
    their mean, as Keras' all-reduce of the replicas' gradients of loss ÷ replicas gives."""
    per_shard: list[list[Any]] = []
    variables: list[Any] = []
    for shard in shards:
        restore()
        grads, variables = _gradients(model, shard, select, jit_compile)
        per_shard.append(grads)
    count = np.float32(len(shards))
    # Summed as the all-reduce sums the replicas' (already divided) gradients.
    mean = [
        None if parts[0] is None else sum(g / count for g in parts)
        for parts in zip(*per_shard, strict=True)
    ]
    return mean, variables


def _compare(
    bundle: Path,
    manifest: dict[str, Any],
    grads: list[Any],
    variables: list[Any],
    names: RecordedNames,
) -> ReplayReport:
    sums32: dict[str, float] = {}
    sums64: dict[str, float] = {}
    bad: dict[str, int] = {}
    largest: dict[str, float] = {}
    for grad, variable in zip(grads, variables, strict=True):
        if grad is None:
            continue
        layer = names.layer_of(variable)
        g32 = grad.astype(np.float32)
        with np.errstate(all="ignore"):
            square32 = float(np.sum(np.square(g32), dtype=np.float32))
            square64 = float(np.sum(np.square(grad.astype(np.float64))))
        sums32[layer] = sums32.get(layer, 0.0) + square32
        sums64[layer] = sums64.get(layer, 0.0) + square64
        finite = np.isfinite(grad)
        bad[layer] = bad.get(layer, 0) + int(np.size(grad) - np.count_nonzero(finite))
        peak = float(np.max(np.abs(grad[finite]))) if finite.any() else 0.0
        largest[layer] = max(largest.get(layer, 0.0), peak)
    step = int(manifest["step"])
    rows = [row for row in manifest.get("recorded", []) if row["step"] == step]
    recorded_row = rows[-1] if rows else None
    recorded = (
        dict(zip(manifest.get("layers", []), recorded_row["grad_norm"], strict=False))
        if recorded_row
        else {}
    )
    layers = [
        LayerNorms(
            layer=layer,
            replayed=math.sqrt(sums32[layer]) if sums32[layer] >= 0 else math.nan,
            replayed_float64=math.sqrt(sums64[layer]) if sums64[layer] >= 0 else math.nan,
            recorded=_recorded(recorded, layer),
            nonfinite=bad[layer],
            max_abs=largest[layer],
        )
        for layer in sums32
    ]
    with np.errstate(all="ignore"):
        total = (
            math.sqrt(sum(sums32.values())) if all(s >= 0 for s in sums32.values()) else math.nan
        )
    recorded_norm = None if recorded_row is None else float(recorded_row["global_norm"])
    nonfinite = any(item.nonfinite for item in layers) or not math.isfinite(total)
    if manifest["cause"] == "nonfinite":
        reproduced = nonfinite
    else:
        reproduced = recorded_norm is not None and math.isclose(total, recorded_norm, rel_tol=1e-4)
    return ReplayReport(
        bundle=bundle,
        step=step,
        cause=str(manifest["cause"]),
        reproduced=reproduced,
        global_norm=total,
        recorded_global_norm=recorded_norm,
        layers=layers,
    )


def _recorded(recorded: dict[str, Any], layer: str) -> float | None:
    """The recorded norm of ``layer``: same name, or the recorded name ending with it."""
    if layer in recorded:
        return float(recorded[layer])
    tail = layer.split("/", 1)[-1]
    matches = [v for name, v in recorded.items() if name.split("/", 1)[-1] == tail]
    return float(matches[0]) if len(matches) == 1 else None


_OP = re.compile(r'output \d+ of (?:eagerly-executing|graph) op "?(\w+)"?')
_PACKAGES = (tf, keras, sys.modules[__name__.rpartition(".")[0]])
_LIBRARIES = tuple(
    str(Path(module.__file__).resolve().parent) + "/" for module in _PACKAGES if module.__file__
)
"""Frames under these directories are not the user's code (TensorFlow, Keras, gradwatch)."""


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    resolved = str(Path(filename).resolve())
    installed = "/site-packages/" in resolved or "/dist-packages/" in resolved
    return installed or resolved.startswith(_LIBRARIES)


def _first_bad_op(model: Any, data: tuple[Any, ...], select: _Selection) -> FirstBadOp | None:
    # Keras and TensorFlow drop their own frames from tracebacks; the layer is found there.
    keras_filtering = keras.config.is_traceback_filtering_enabled()
    tf_filtering = tf.debugging.is_traceback_filtering_enabled()
    keras.config.disable_traceback_filtering()
    tf.debugging.disable_traceback_filtering()
    tf.debugging.enable_check_numerics()
    try:
        _intercepted_step(model, data, select)
    except tf.errors.InvalidArgumentError as error:
        message = str(error.message if hasattr(error, "message") else error)
        match = _OP.search(message)
        op = match.group(1) if match else "unknown"
        layer, frame, code = _where(error.__traceback__)
        layer = None if layer is None else select.names.layer(layer)
        first = next((line.strip() for line in message.splitlines() if "Detected" in line), "")
        return FirstBadOp(
            op=op, layer=layer, frame=frame, code=code, message=first or message[:200]
        )
    finally:
        tf.debugging.disable_check_numerics()
        if keras_filtering:
            keras.config.enable_traceback_filtering()
        if tf_filtering:
            tf.debugging.enable_traceback_filtering()
    return None


def _where(tb: Any) -> tuple[str | None, str | None, str | None]:
    """The innermost running Keras layer and the innermost frame outside the libraries."""
    layer = frame = code = None
    while tb is not None:
        frame_object = tb.tb_frame
        owner = frame_object.f_locals.get("self")
        if isinstance(owner, keras.layers.Layer) and not isinstance(owner, keras.Model):
            layer = str(getattr(owner, "path", None) or owner.name)
        if not _is_library(frame_object.f_code.co_filename):
            summary = traceback.extract_tb(tb, limit=1)[0]
            frame = f"{summary.filename}:{summary.lineno} in {summary.name}"
            code = summary.line
        tb = tb.tb_next
    return layer, frame, code
