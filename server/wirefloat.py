"""The float of the wire format: a JSON number within float32's range, or a non-finite string.

Floats travel as JSON numbers or exactly one of the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (the protobuf JSON convention) and are stored as float32. A finite number
beyond ±:data:`FLOAT32_MAX` (``1e300``, or a JSON ``1e400`` that Python reads as infinity)
would silently become ±Infinity, so it is refused, with a message that says how to send an
infinite value: what is stored is exactly what was sent. Immutable; thread-safe.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import numpy as np
from pydantic import GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

from gradwatch.wire import NONFINITE_STRINGS

__all__ = ["FLOAT32_MAX", "WIRE_FLOAT_ERROR", "WireFloat"]


def _decode_non_finite(text: str) -> float:
    return NONFINITE_STRINGS[text]


FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
"""Largest finite float32 (≈ 3.4028235e38): wire floats are stored as float32."""


class _WireFloatSchema:
    """Core schema of a wire float: a number within float32's range, or "NaN", "Infinity",
    "-Infinity".

    Validated in pydantic-core (no Python call per value) with one error per bad value.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.union_schema(
            [
                core_schema.float_schema(
                    strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX
                ),
                core_schema.no_info_after_validator_function(
                    _decode_non_finite, core_schema.literal_schema(list(NONFINITE_STRINGS))
                ),
            ],
            custom_error_type="wire_float",
            custom_error_message=WIRE_FLOAT_ERROR,
        )


WIRE_FLOAT_ERROR: Final = (
    f"Input should be a number within float32's range (±{FLOAT32_MAX:.7e}; values are stored "
    "as float32) or one of the strings 'NaN', 'Infinity', '-Infinity': send an infinite or "
    "overflowing value as the string 'Infinity' or '-Infinity'"
)
"""The message of every invalid wire float."""

WireFloat = Annotated[float, _WireFloatSchema]
"""A float as it travels: a JSON number within ±``FLOAT32_MAX``, or "NaN" / "Infinity" /
"-Infinity"."""
