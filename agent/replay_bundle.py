"""Reading an incident bundle for :mod:`gradwatch.agent.replay`: its manifest and checkpoint,
the batch, the model (the user's ``model_fn`` or the bundle's JSON) and what restores the
captured variables into it.

Blocks on disk reads; imports TensorFlow and Keras. Not thread-safe (restoring assigns the
model's variables).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import _keras_compat as compat
from .bundle import BUNDLE_FORMATS, bundle_path, from_template, leaf_names

__all__ = [
    "BundleError",
    "RecordedNames",
    "batch_data",
    "build_model",
    "compile_from_manifest",
    "input_names",
    "open_bundle",
    "read_batch",
    "read_tensor",
    "replica_shards",
    "restorer",
]


class BundleError(Exception):
    """The bundle cannot be read or replayed (the message says why and what to do)."""


def open_bundle(bundle: Path) -> tuple[dict[str, Any], Any]:
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BundleError(f"{bundle}: no readable manifest.json ({error})") from None
    if manifest.get("format") not in BUNDLE_FORMATS:
        raise BundleError(
            f"{path}: format {manifest.get('format')!r}, this gradwatch reads "
            f"{' and '.join(map(repr, BUNDLE_FORMATS))}"
        )
    try:
        reader = tf.train.load_checkpoint(str(bundle / manifest["checkpoint"]))
    except (tf.errors.OpError, ValueError) as error:
        raise BundleError(f"{bundle}: the checkpoint cannot be read ({error})") from None
    return manifest, reader


def read_tensor(reader: Any, kind: str, index: int) -> np.ndarray:
    return np.asarray(reader.get_tensor(f"{kind}/{index}/.ATTRIBUTES/VARIABLE_VALUE"))


def read_batch(manifest: dict[str, Any], reader: Any, prefix: str = "") -> tuple[Any, ...]:
    """The bad step's batch, or with ``prefix`` ``earlier/j/`` a rolling bundle's ``j``-th
    earlier batch (:mod:`.incident_rolling`), as NumPy leaves."""
    batch = manifest.get("batch")
    if not batch:
        position = manifest.get("position")
        if position:  # fit: as the monitor said when training began
            raise BundleError(
                f"the bundle holds no batch (in fit under XLA, when the data's size is not a "
                f"multiple of batch_size); the bad batch is step {position['step_in_epoch']} "
                f"of epoch {position['epoch']} of the data"
            )
        raise BundleError(
            "the bundle holds no batch: in a custom loop, call monitor.capture_batch((x, y)) "
            "after apply_gradients in the step"
        )
    leaves = []
    for index, spec in enumerate(batch["inputs"]):
        if spec is None:
            raise BundleError(f"input {index} of the batch was not numeric and was not captured")
        shape = read_tensor(reader, f"{prefix}batch_shape", index).astype(np.int64)
        flat = read_tensor(reader, f"{prefix}batch", index)
        leaves.append(flat[: int(np.prod(shape))].reshape(shape))
    return tuple(leaves)


def batch_data(manifest: dict[str, Any], leaves: tuple[Any, ...]) -> Any:
    """The batch as ``fit`` gave it to ``train_step``: nested as it was (dicts of named
    inputs too), or for bundles without ``nest`` a bare tensor or a tuple."""
    batch = manifest.get("batch") or {}
    if batch.get("nest") is not None:
        return from_template(batch["nest"], leaves)
    return leaves if batch.get("packed", True) or len(leaves) != 1 else leaves[0]


def replica_shards(data: Any, replicas: int) -> list[Any] | None:
    """The global batch ``data`` cut into the ``replicas`` shards ``tf.distribute`` gave its
    replicas (equal, contiguous, in order), or None when it does not cut evenly (or there is
    one replica)."""
    leaves = tf.nest.flatten(data)
    sizes = {int(np.shape(leaf)[0]) for leaf in leaves if np.ndim(leaf) > 0}
    if replicas <= 1 or len(sizes) != 1 or next(iter(sizes)) % replicas:
        return None
    size = next(iter(sizes)) // replicas
    return [
        tf.nest.map_structure(
            lambda leaf, r=r: leaf[r * size : (r + 1) * size] if np.ndim(leaf) > 0 else leaf,
            data,
        )
        for r in range(replicas)
    ]


def input_names(manifest: dict[str, Any]) -> list[str]:
    """The batch's leaves' names (``x``, ``y``, ``x[image]``...), in ``batch/i`` order."""
    batch = manifest.get("batch") or {}
    if batch.get("nest") is not None:
        return leaf_names(batch["nest"])
    return str(batch.get("structure", "x")).split(",")


def _load_function(spec: str) -> Callable[[], Any]:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise BundleError(f"--model-fn: expected module:function, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise BundleError(f"--model-fn {spec}: {error}") from None
    finally:
        sys.path.pop(0)
    if not callable(function):
        raise BundleError(f"--model-fn {spec}: not a function")
    return function  # type: ignore[no-any-return]


def build_model(manifest: dict[str, Any], model_fn: str | None) -> Any:
    if model_fn is not None:
        return _load_function(model_fn)()
    description = manifest.get("model") or {}
    if not description.get("json"):
        raise BundleError(
            f"the bundle holds no model config ({description.get('class', 'a custom loop')}): "
            "pass --model-fn module:function returning the model"
        )
    try:
        return keras.models.model_from_json(description["json"])
    except Exception as error:
        raise BundleError(
            f"the model cannot be rebuilt from its config ({error}); pass --model-fn "
            "module:function returning the model"
        ) from None


def compile_from_manifest(model: Any, manifest: dict[str, Any]) -> None:
    config = (manifest.get("model") or {}).get("compile")
    if not config:
        raise BundleError("the model is not compiled: return a compiled model from --model-fn")
    model.compile_from_config(config)
    model.optimizer = keras.optimizers.deserialize(manifest["optimizer"])


def restorer(
    model: Any, inner: Any | None, manifest: dict[str, Any], reader: Any
) -> Callable[[], None]:
    """Check that the model's variables match the bundle's; return what restores them."""
    pairs: list[tuple[Any, np.ndarray]] = []
    state = list(model.non_trainable_variables)
    seeds = [v for v in state if compat.is_seed_state(v)]
    for kind, variables, specs in (
        ("weights", model.trainable_variables, manifest["weights"]),
        (
            "optimizer",
            [] if inner is None else inner.variables,
            None if inner is None else manifest["optimizer_variables"],
        ),
        ("rng", seeds, manifest.get("rng_states")),  # absent: custom loops, older bundles
        (
            "model_state",
            [v for v in state if not compat.is_seed_state(v)],
            manifest.get("model_state"),
        ),
    ):
        if specs is None:
            continue
        if len(variables) != len(specs):
            raise BundleError(
                f"{kind}: the model has {len(variables)} variables, the bundle {len(specs)}: "
                "is --model-fn building the same model and optimizer?"
            )
        for index, (variable, spec) in enumerate(zip(variables, specs, strict=True)):
            value = read_tensor(reader, kind, index)
            if list(value.shape) != [int(d) for d in variable.shape]:
                raise BundleError(
                    f"{kind}: {spec['path']} has shape {list(value.shape)} in the bundle and "
                    f"{list(variable.shape)} in the model: is --model-fn building the same model "
                    "and optimizer?"
                )
            pairs.append((variable, value))
    scale = _recorded_loss_scale(model, manifest)
    if scale is not None:
        pairs.append(scale)

    def restore() -> None:
        for variable, value in pairs:
            variable.assign(value)

    return restore


def _recorded_loss_scale(model: Any, manifest: dict[str, Any]) -> tuple[Any, np.ndarray] | None:
    """A ``LossScaleOptimizer``'s scale as training had it when the restored state begins
    (the bad step, or a rolling bundle's copy), from the recorded rows; None without one.

    A rebuilt LSO starts at its initial scale (32,768): the replay's scaled float16 backward
    pass would overflow where training's (often at 256 by then) did not, and check_numerics
    would name that cast instead of the step's own fault.
    """
    variable = getattr(getattr(model, "optimizer", None), "dynamic_scale", None)
    begins = int((manifest.get("roll_forward") or {}).get("from_step", manifest["step"]))
    found = [
        row.get("loss_scale")
        for row in manifest.get("recorded", [])
        if int(row["step"]) == begins and row.get("loss_scale") is not None
    ]
    if variable is None or not found:
        return None
    return variable, np.asarray(float(found[-1]), dtype=np.float32)


class RecordedNames:
    """The names the bundle recorded for the rebuilt model's variables and layers.

    A model rebuilt in a process that has made models before gets Keras' unique names
    (``sequential_1/dense`` for the recorded ``sequential/dense``): in a notebook, or a job
    that builds a GAN's parts before its replay. The replay reports the recorded names, the
    ones the server and the monitor's output show: a variable by its position in the bundle,
    a layer without variables by the recorded prefix of the rebuilt path's longest prefix
    some variable shares.

    Host-side, pure; not thread-safe to build, safe to read.
    """

    def __init__(self, variables: list[Any], specs: list[dict[str, Any]]) -> None:
        self._by_variable: dict[int, str] = {}
        self._prefixes: dict[str, str] = {}
        for variable, spec in zip(variables, specs, strict=False):
            recorded = str(spec["path"])
            self._by_variable[id(variable)] = recorded
            rebuilt_parts, recorded_parts = bundle_path(variable).split("/"), recorded.split("/")
            if len(rebuilt_parts) == len(recorded_parts):  # same tree, renamed folders
                for end in range(1, len(rebuilt_parts)):
                    rebuilt = "/".join(rebuilt_parts[:end])
                    self._prefixes.setdefault(rebuilt, "/".join(recorded_parts[:end]))

    def variable(self, variable: Any) -> str:
        """The variable's recorded path (its own when the bundle does not hold it)."""
        return self._by_variable.get(id(variable), bundle_path(variable))

    def layer_of(self, variable: Any) -> str:
        """The recorded path of the layer holding ``variable``: its path minus the last part."""
        path = self.variable(variable)
        return path.rsplit("/", 1)[0] if "/" in path else path

    def layer(self, path: str) -> str:
        """A rebuilt layer's path, with its longest known prefix renamed as recorded."""
        parts = path.split("/")
        for end in range(len(parts), 0, -1):
            recorded = self._prefixes.get("/".join(parts[:end]))
            if recorded is not None:
                return "/".join([recorded, *parts[end:]])
        return path
