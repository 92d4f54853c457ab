"""Line charts as inline SVG, drawn in Python: no JavaScript, no plotting library, no CDN.

One chart is a set of series over a shared step axis, on a linear or log₁₀ y axis. Lines
break where a value is missing or cannot be drawn (NaN, ±Inf, or ≤ 0 on a log axis); a
series that ever held a non-finite value gets a ✕ on the chart's top edge at the first such
step. Long series are reduced to at most ``max_points`` points by keeping each bucket's
largest value, so a one-step spike stays visible. Pure; never blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["Line", "line_chart"]

_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 52, 12, 26, 30


@dataclass(frozen=True, slots=True)
class Line:
    """One series: ``values[i]`` at ``steps[i]``, drawn in ``color`` (a CSS colour).

    ``width`` is the stroke width in CSS pixels: a wide pale line drawn first stays visible
    under thin ones that follow the same path.
    """

    name: str
    color: str
    steps: Sequence[int]
    values: Sequence[float]
    width: float = 1.4


def _drawable(value: float, log_y: bool) -> bool:
    return math.isfinite(value) and (value > 0.0 or not log_y)


def _reduce(line: Line, max_points: int) -> list[tuple[int, float]]:
    points = list(zip(line.steps, line.values, strict=True))
    if len(points) <= max_points:
        return points
    width = math.ceil(len(points) / max_points)
    out = []
    for start in range(0, len(points), width):
        bucket = points[start : start + width]
        finite = [p for p in bucket if math.isfinite(p[1])]
        out.append(max(finite, key=lambda p: p[1]) if finite else bucket[0])
    return out


def _range(values: list[float], log_y: bool) -> tuple[float, float]:
    if not values:
        return (0.0, 1.0)
    low, high = min(values), max(values)
    if log_y:
        low, high = math.floor(math.log10(low)), math.ceil(math.log10(high))
        return (low, high if high > low else low + 1)
    if high == low:
        return (low - 1.0, high + 1.0)
    margin = 0.05 * (high - low)
    return (low - margin, high + margin)


def _fmt_tick(value: float, log_y: bool) -> str:
    if log_y:
        return f"1e{int(value)}"
    return f"{value:.3g}"


def _y_ticks(low: float, high: float, log_y: bool) -> list[float]:
    if log_y:
        step = max(1, math.ceil((high - low) / 6))
        return [float(k) for k in range(int(low), int(high) + 1, step)]
    return [low + (high - low) * i / 4 for i in range(5)]


def line_chart(
    title: str,
    lines: Sequence[Line],
    *,
    log_y: bool = True,
    max_step: int | None = None,
    width: int = 480,
    height: int = 220,
    max_points: int = 600,
) -> str:
    """An ``<svg>`` element drawing ``lines`` (see the module docstring).

    Args:
        title: Drawn at the top left, and the SVG's accessible name.
        lines: The series.
        log_y: A log₁₀ y axis (else linear).
        max_step: Right end of the step axis (default: the last step of any line).
        width: Width in CSS pixels.
        height: Height in CSS pixels.
        max_points: Most points drawn per line.
    """
    reduced = [(line, _reduce(line, max_points)) for line in lines]
    drawable = [v for _, pts in reduced for _, v in pts if _drawable(v, log_y)]
    y_low, y_high = _range(drawable, log_y)
    last = max((s for line in lines for s in line.steps), default=1)
    x_high = max(max_step or last, 1)
    plot_w = width - _PAD_LEFT - _PAD_RIGHT
    plot_h = height - _PAD_TOP - _PAD_BOTTOM

    def x_of(step: float) -> float:
        return _PAD_LEFT + plot_w * step / x_high

    def y_of(value: float) -> float:
        v = math.log10(value) if log_y else value
        return _PAD_TOP + plot_h * (1.0 - (v - y_low) / (y_high - y_low))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{_PAD_LEFT}" y="16" class="title">{escape(title)}</text>',
        f'<rect x="{_PAD_LEFT}" y="{_PAD_TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for tick in _y_ticks(y_low, y_high, log_y):
        y = _PAD_TOP + plot_h * (1.0 - (tick - y_low) / (y_high - y_low))
        parts.append(
            f'<line x1="{_PAD_LEFT}" x2="{_PAD_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            f'class="grid"/><text x="{_PAD_LEFT - 4}" y="{y + 4:.1f}" class="tick" '
            f'text-anchor="end">{_fmt_tick(tick, log_y)}</text>'
        )
    for i in range(5):
        step = x_high * i / 4
        parts.append(
            f'<text x="{x_of(step):.1f}" y="{height - 10}" class="tick" '
            f'text-anchor="middle">{round(step)}</text>'
        )
    for line, points in reduced:
        segments: list[list[str]] = [[]]
        for step, value in points:
            if _drawable(value, log_y):
                segments[-1].append(f"{x_of(step):.1f},{y_of(value):.1f}")
            elif segments[-1]:
                segments.append([])
        for segment in segments:
            if len(segment) == 1:
                cx, cy = segment[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{line.color}"/>')
            elif segment:
                parts.append(
                    f'<polyline class="series" data-series="{escape(line.name)}" '
                    f'stroke="{line.color}" stroke-width="{line.width:g}" '
                    f'points="{" ".join(segment)}"/>'
                )
        bad = [s for s, v in zip(line.steps, line.values, strict=True) if not math.isfinite(v)]
        if bad:
            parts.append(
                f'<text x="{x_of(bad[0]):.1f}" y="{_PAD_TOP + 4}" class="nonfinite" '
                f'fill="{line.color}" text-anchor="middle">✕<title>{escape(line.name)}: '
                f"non-finite from step {bad[0]}</title></text>"
            )
    parts.append("</svg>")
    return "".join(parts)
