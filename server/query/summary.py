"""Read stored summary columns back under their NULL conventions (see ``models``).

NaN is never stored in a float column: a NULL maximum after values were stored means every
value was NaN, a NULL last value means the last value was NaN. Pure; thread-safe.
"""

from __future__ import annotations

import math

__all__ = ["last_value", "max_value"]


def max_value(count: int, vmax: float | None) -> float | None:
    """Largest value; NaN when every value was NaN; None before any value."""
    if count == 0:
        return None
    return math.nan if vmax is None else vmax


def last_value(last_step: int | None, vlast: float | None) -> float | None:
    """Latest value; NaN when it was NaN; None before any value."""
    if last_step is None:
        return None
    return math.nan if vlast is None else vlast
