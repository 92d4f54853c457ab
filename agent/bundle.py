"""The incident bundle on disk: its manifest's parts and the server's announcement of it.

Pure host-side helpers of :mod:`gradwatch.agent.incident` (JSON-able values from variables,
recorded batches and models); thread-safe, no TensorFlow graph work.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .records import StepBatch

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMATS",
    "ROLLING_FORMAT",
    "announcement",
    "bundle_path",
    "describe",
    "from_template",
    "leaf_names",
    "learning_rate",
    "model_description",
    "nest_template",
    "number",
    "recorded",
    "recorded_columns",
    "recorded_rows",
    "structure",
]

BUNDLE_FORMAT = "gradwatch-incident/1"
"""``manifest.json``'s ``format``: bump when a field changes meaning."""

ROLLING_FORMAT = "gradwatch-incident/2"
"""The format of a rolling bundle (``roll_forward``): its state is a copy from before the
step, which a reader of ``/1`` would replay from without running the steps in between."""

BUNDLE_FORMATS = (BUNDLE_FORMAT, ROLLING_FORMAT)
"""The formats the replay reads."""


def recorded_rows(
    recent: Iterable[StepBatch], step: int, keep: int, after: int = -1
) -> list[dict[str, Any]]:
    """The last ``keep`` rows of ``recent`` with ``after < step' <= step``, as JSON-able dicts."""
    rows = []
    for batch in recent:
        for i in range(len(batch.step)):
            if not after < int(batch.step[i]) <= step:
                continue
            rows.append(
                {
                    "step": int(batch.step[i]),
                    "loss": number(batch.loss[i]) if batch.loss_known[i] else None,
                    "global_norm": number(batch.global_norm[i]),
                    "clip_coef": number(batch.clip_coef[i]),
                    "skipped": bool(batch.skipped[i]),
                    "grad_norm": [number(v) for v in batch.grad_norm[i]],
                    "nonfinite": [int(v) for v in batch.nonfinite[i]],
                    "learning_rate": recorded(batch.learning_rate, i),
                    "loss_scale": recorded(batch.loss_scale, i),
                }
            )
    return rows[-max(1, keep) :]


def announcement(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The wire ``incidents`` item of a written bundle (finite numbers or null only)."""
    step = manifest["step"]
    rows: list[dict[str, Any]] = manifest["recorded"]
    row: dict[str, Any] = next((r for r in reversed(rows) if r["step"] == step), {})

    return {
        "step": step,
        "cause": manifest["cause"],
        "path": str(path.resolve()),
        "host": socket.gethostname()[:255],
        "bytes": manifest["bytes"],
        "format": manifest["format"],
        "learning_rate": finite(
            row["learning_rate"]
            if row.get("learning_rate") is not None
            else manifest["learning_rate"]
        ),
        "loss_scale": finite(row.get("loss_scale")),
        # The flight recorder's scalars the server has no series of, up to the bad step.
        "recorded": recorded_columns(rows),
    }


def recorded_columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Recorded rows as the wire's columns (``IncidentRows``): the scalars the server keeps
    no series of, one entry per step, finite numbers or null."""
    return {
        "step": [r["step"] for r in rows],
        "learning_rate": [finite(r.get("learning_rate")) for r in rows],
        "loss_scale": [finite(r.get("loss_scale")) for r in rows],
        "epoch": [r.get("epoch") for r in rows],
        "step_in_epoch": [r.get("step_in_epoch") for r in rows],
    }


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None``."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def structure(data: Any) -> str:
    """How a batch unpacks: ``x``, ``x,y`` or ``x,y,sample_weight`` (Keras' convention)."""
    if isinstance(data, tuple | list) and 1 <= len(data) <= 3:
        return ",".join(("x", "y", "sample_weight")[: len(data)])
    return "x"


def nest_template(data: Any) -> Any:
    """How a batch nests, JSON-able: each leaf replaced by its index in ``tf.nest.flatten``
    order (the order of the bundle's ``batch/i``), a dict as ``{"dict": {key: ...}}``, a tuple
    or list as ``{"tuple": [...]}``; so a model with named inputs gets its dict back."""
    counter = itertools.count()
    indexed = tf.nest.map_structure(lambda _: next(counter), data)

    def tag(node: Any) -> Any:
        if isinstance(node, dict):
            return {"dict": {str(key): tag(value) for key, value in node.items()}}
        if isinstance(node, tuple | list):
            return {"tuple": [tag(value) for value in node]}
        return node

    return tag(indexed)


def from_template(template: Any, leaves: Sequence[Any]) -> Any:
    """The batch :func:`nest_template` describes, made of ``leaves``."""
    if isinstance(template, dict) and "dict" in template:
        return {key: from_template(value, leaves) for key, value in template["dict"].items()}
    if isinstance(template, dict) and "tuple" in template:
        return tuple(from_template(value, leaves) for value in template["tuple"])
    return leaves[int(template)]


def leaf_names(template: Any) -> list[str]:
    """Each leaf's name in flatten order: ``x``, ``y``, ``sample_weight`` and, nested,
    ``x[name]`` or ``x[0]``."""
    names: dict[int, str] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict) and "dict" in node:
            for key, value in node["dict"].items():
                walk(value, f"{name}[{key}]")
        elif isinstance(node, dict) and "tuple" in node:
            for index, value in enumerate(node["tuple"]):
                walk(value, f"{name}[{index}]")
        else:
            names[int(node)] = name

    if isinstance(template, dict) and "tuple" in template and len(template["tuple"]) <= 3:
        for part, value in zip(("x", "y", "sample_weight"), template["tuple"], strict=False):
            walk(value, part)
    else:
        walk(template, "x")
    return [names[index] for index in sorted(names)]


def bundle_path(variable: Any) -> str:
    """A variable's name in a manifest: its Keras path (``model/dense/kernel``)."""
    return str(getattr(variable, "path", variable.name))


def describe(variable: Any) -> dict[str, Any]:
    return {
        "path": bundle_path(variable),
        "shape": [int(d) for d in variable.shape],
        "dtype": tf.as_dtype(variable.dtype).name,
    }


def number(value: Any) -> float | str:
    number = float(value)
    return number if math.isfinite(number) else str(number)


def recorded(column: Any, i: int) -> float | str | None:
    """Row ``i`` of a flight-recorder column: ``None`` where it is not recorded (NaN)."""
    if column is None or np.isnan(column[i]):
        return None
    return number(column[i])


def learning_rate(optimizer: Any) -> float | None:
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except Exception:
        return None


def model_description(model: Any) -> dict[str, Any] | None:
    if model is None:
        return None
    description: dict[str, Any] = {"class": type(model).__qualname__, "json": None}
    with contextlib.suppress(Exception):  # subclassed models without get_config
        description["json"] = model.to_json()
    try:
        description["compile"] = model.get_compile_config()
    except Exception:
        description["compile"] = None
    return description
