"""A recorded scalar over steps (a learning rate, a loss scale) as one line for a person.

Used by ``gradwatch replay`` and by the incident replies of the REST API. Pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["history_line"]


def _number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def history_line(name: str, history: Sequence[tuple[int, float]]) -> str | None:
    """One line of a recorded scalar over the last steps, as its runs of equal values.

    ``learning rate: 0.01 at steps 1–11, 30 from step 12 (×3000)``; ``None`` when nothing
    was recorded (a bundle from before the flight recorder kept it).
    """
    if not history:
        return None
    runs: list[list[Any]] = []  # [first step, last step, value]
    for step, value in history:
        if runs and (runs[-1][2] == value or (math.isnan(value) and math.isnan(runs[-1][2]))):
            runs[-1][1] = step
        else:
            runs.append([step, step, value])
    parts = []
    for i, (first, last, value) in enumerate(runs):
        if i > 0 and i == len(runs) - 1:
            where = f"from step {first}"
        else:
            where = f"at step {first}" if first == last else f"at steps {first}–{last}"
        previous = runs[i - 1][2] if i > 0 else 0.0
        ratio = value / previous if previous else math.nan
        change = f" (×{ratio:.4g})" if math.isfinite(ratio) else ""
        parts.append(f"{_number(value)} {where}{change}")
    return f"{name}: " + ", ".join(parts)
