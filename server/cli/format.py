"""Terminal rendering shared by the read commands: numbers, verdicts, times, sparklines.

Replies keep non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
(the wire convention); :func:`as_float` decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.text import Text

__all__ = [
    "INCIDENT_CAUSES",
    "Sparkline",
    "as_float",
    "describe_health",
    "format_age",
    "format_number",
    "format_time",
    "sparkline",
    "verdict_text",
]

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_BARS = "▁▂▃▄▅▆▇█"
_VERDICT_STYLE = {
    "healthy": "green",
    "warning": "yellow",
    "critical": "bold red",
    "no_data": "dim",
}
NAN_MARK = "×"
"""Sparkline cell of a bucket whose values are all NaN."""
INF_MARK = "∞"
"""Sparkline cell of a bucket that holds +Inf."""

INCIDENT_CAUSES = {
    "nonfinite": "non-finite gradient",
    "skipped": "skipped by the policy",
    "explosion": "exploding gradient",
}
"""Why an incident bundle was written, for a person (its ``cause``)."""


def as_float(value: Any) -> float | None:
    """A reply's number as a float (``"NaN"``/``"Infinity"`` decoded); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return _NONFINITE[value]
    return float(value)


def format_number(value: Any) -> str:
    """A count or norm for a table cell: ``1.234e+06``, ``0.5``, ``NaN``, ``inf``, or ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    number = as_float(value)
    assert number is not None
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.4g}"


def format_age(timestamp: str | None, now: datetime | None = None) -> str:
    """How long ago an ISO timestamp was, e.g. ``3m ago``; ``-`` for None."""
    if timestamp is None:
        return "-"
    moment = _parse(timestamp)
    seconds = max(0.0, ((now or datetime.now(UTC)) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def format_time(timestamp: str | None) -> str:
    """An ISO timestamp in local time, ``2024-05-01 12:00:03``; ``-`` for None."""
    if timestamp is None:
        return "-"
    return _parse(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _parse(timestamp: str) -> datetime:
    moment = datetime.fromisoformat(timestamp)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def describe_health(health: dict[str, Any]) -> str:
    """The verdict and the rules that fired so far, e.g. ``critical: explosion 12, nonfinite 3``."""
    fired = [
        f"{rule} {total}"
        for rule, by_severity in health["detections"].items()
        if (total := sum(by_severity.values()))
    ]
    verdict = str(health["verdict"])
    return f"{verdict}: {', '.join(fired)}" if fired else verdict


def verdict_text(text: str, verdict: str) -> Text:
    """``text`` coloured by the verdict (green, yellow, red)."""
    return Text(text, style=_VERDICT_STYLE.get(verdict, ""))


@dataclass(frozen=True, slots=True)
class Sparkline:
    """A series drawn as one character per bucket.

    Attributes:
        text: The cells, coloured: bars on a log scale when every finite value is positive,
            else linear; ``∞`` (red) for a bucket holding +Inf, ``×`` (magenta) for an all-NaN
            bucket.
        low: Smallest finite value drawn, or None.
        high: Largest finite value drawn, or None.
        log_scale: Whether the bars are on a log scale.
        first_step: Step of the first cell.
        last_step: Last step the last cell covers.
        steps_per_cell: Steps one cell covers (1 for raw points).
    """

    text: Text
    low: float | None
    high: float | None
    log_scale: bool
    first_step: int
    last_step: int
    steps_per_cell: int


def sparkline(series: dict[str, Any]) -> Sparkline | None:
    """Draw a ``GET …/series`` reply, raw or bucketed (the bucket max, so spikes show).

    Returns None for an empty series.
    """
    steps: Sequence[int] = series["step"]
    if not steps:
        return None
    bucketed = bool(series.get("downsampled"))
    width = int(series["bucket_width"]) if bucketed else 1
    values = [as_float(v) for v in (series["max"] if bucketed else series["value"])]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low = min(finite) if finite else None
    high = max(finite) if finite else None
    log_scale = low is not None and low > 0
    text = Text()
    for value in values:
        if value is None or math.isnan(value):
            text.append(NAN_MARK, style="bold magenta")
        elif math.isinf(value):
            text.append(INF_MARK if value > 0 else NAN_MARK, style="bold red")
        else:
            assert low is not None
            assert high is not None
            level = _level(value, low, high, log_scale)
            text.append(_BARS[level], style="cyan")
    return Sparkline(
        text=text,
        low=low,
        high=high,
        log_scale=log_scale,
        first_step=int(steps[0]),
        last_step=int(steps[-1]) + width - 1,
        steps_per_cell=width,
    )


def _level(value: float, low: float, high: float, log_scale: bool) -> int:
    if high <= low:
        return 0
    if log_scale:
        fraction = math.log(value / low) / math.log(high / low)
    else:
        fraction = (value - low) / (high - low)
    return min(len(_BARS) - 1, max(0, round(fraction * (len(_BARS) - 1))))
