"""The ``StepBatch`` wire format (schema 1), shared by the agent and the server.

Pure Python plus NumPy: no TensorFlow, no FastAPI, no pydantic, so both sides
import it cheaply. It is the one place that says

- which fields a batch has (:data:`RUN_FIELDS` one value per step,
  :data:`LAYER_FIELDS` one row per step with one value per layer),
- the schema version (:data:`SCHEMA_VERSION`),
- how non-finite floats travel: the strings ``"NaN"``, ``"Infinity"`` and
  ``"-Infinity"`` (the protobuf JSON convention), since JSON has no literal
  for them (:func:`encode_float`, :func:`decode_float` and the array forms
  :func:`encode_floats`, :func:`decode_floats`),
- the integer ranges steps and counts must fit (:data:`MAX_STEP`,
  :data:`MAX_COUNT`).

Everything here is a pure function or a constant: thread-safe, never blocks.
See DESIGN.md §5 for the format itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "LAYER_FIELDS",
    "MAX_COUNT",
    "MAX_STEP",
    "NONFINITE_STRINGS",
    "OPTIONAL_FIELDS",
    "RUN_FIELDS",
    "SCHEMA_VERSION",
    "DuplicateKeyError",
    "decode_float",
    "decode_floats",
    "encode_float",
    "encode_floats",
    "unique_keys",
]

SCHEMA_VERSION: Final = 1
"""The ``schema`` value of the batches this version writes and reads."""

RUN_FIELDS: Final = ("loss", "global_norm", "global_norm_clipped", "clip_coef", "skipped")
"""Fields with one value per step (besides ``step`` itself)."""

LAYER_FIELDS: Final = ("grad_norm", "nonfinite", "weight_norm", "update_ratio")
"""Fields with one row per step and one value per layer, in ``layers`` order."""

OPTIONAL_FIELDS: Final = ("loss", "weight_norm", "update_ratio")
"""Fields a batch may leave out; their ``null`` entries mean "not measured at that step"."""

MAX_STEP: Final = 2**63 - 1
"""Largest step number: steps are stored as signed 64-bit integers."""

MAX_COUNT: Final = 2**53
"""Largest count on the wire: counts must stay exact in float64 summary columns."""

NONFINITE_STRINGS: Final[dict[str, float]] = {
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
}
"""The wire spelling of each non-finite float, and its value."""

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def encode_float(value: float) -> float | str:
    """A float as JSON carries it: itself, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def decode_float(value: float | int | str) -> float:
    """The inverse of :func:`encode_float`.

    Raises:
        ValueError: ``value`` is a string other than the three wire spellings.
    """
    if isinstance(value, str):
        try:
            return NONFINITE_STRINGS[value]
        except KeyError:
            raise ValueError(f"unexpected string {value!r} where a number was expected") from None
    return float(value)


def encode_floats(
    values: npt.NDArray[np.floating[Any]], known: BoolArray | None = None
) -> list[Any]:
    """Turn a float array (any shape) into nested lists for JSON.

    Args:
        values: The values; NaN/±Inf become their wire strings.
        known: Optional mask of the same shape; ``False`` entries become ``None``.
    """
    finite = np.isfinite(values)
    if known is None and finite.all():
        return values.tolist()  # type: ignore[no-any-return]
    out = values.astype(object)
    if not finite.all():
        out[np.isnan(values)] = "NaN"
        out[np.isposinf(values)] = "Infinity"
        out[np.isneginf(values)] = "-Infinity"
    if known is not None:
        out[~known] = None
    return out.tolist()  # type: ignore[no-any-return]


def decode_floats(values: Sequence[Any]) -> tuple[FloatArray, BoolArray]:
    """Inverse of :func:`encode_floats` for a 1-D or 2-D float32 column.

    Returns:
        The values (``None`` entries read as NaN) and the known-mask (``False`` where
        the entry was ``None``), both of the column's shape.

    Raises:
        ValueError: An entry is a string other than the three wire spellings.
    """
    nested = bool(values) and isinstance(values[0], list)
    flat = [v for row in values for v in row] if nested else list(values)
    shape = (len(values), len(values[0])) if nested else (len(values),)
    known = np.array([v is not None for v in flat], dtype=bool).reshape(shape)
    decoded = [math.nan if v is None else decode_float(v) for v in flat]
    return np.array(decoded, dtype=np.float32).reshape(shape), known


class DuplicateKeyError(ValueError):
    """An object (JSON) or map (MessagePack) has a key more than once.

    Attributes:
        key: The repeated key.
    """

    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A decoder's ``object_pairs_hook``: the pairs as a dict, refusing a repeated key
    (which value would win is up to the decoder otherwise).

    Raises:
        DuplicateKeyError: A key appears more than once.
    """
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return result
