"""The self-contained HTML report: summary, table, thresholds and curves in one file.

No JavaScript and nothing fetched: the charts are inline SVG (:mod:`.svg`), the style is
inline, so the file opens offline and can be attached to an issue or a chat as it is.
Pure; :func:`write_page` blocks on the file write.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

from .divergence import DIVERGENCE_FACTOR, SMOOTHING_STEPS
from .result import StudyResult
from .summary import COST_TOLERANCE, label
from .svg import Line, line_chart
from .table import COLUMNS, format_row
from .threshold import VALUE_FACTOR

__all__ = ["REMEDY_COLORS", "render_page", "write_page"]

REMEDY_COLORS = {
    "none": "#9a9a9a",
    "by_value": "#e6550d",
    "by_norm": "#31a354",
    "global_norm": "#3182bd",
    "zclip": "#756bb1",
    "autoclip": "#c51b8a",
}
"""One colour per remedy, the same in every chart."""

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
h3 { font-size: 14px; margin: 18px 0 4px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.diverged td { color: #b00020; } tr.group td { border-top: 2px solid #bbb; }
.muted { color: #666; } code { background: #f4f4f4; padding: 1px 4px; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 18px; height: 3px; vertical-align: middle;
  margin-right: 4px; }
.charts { display: flex; gap: 16px; flex-wrap: wrap; }
svg.chart { background: #fff; }
svg .title { font: 600 12px system-ui, sans-serif; fill: #333; }
svg .tick { font: 10px system-ui, sans-serif; fill: #666; }
svg .frame { fill: none; stroke: #ccc; } svg .grid { stroke: #eee; }
svg .series { fill: none; stroke-linejoin: round; } svg .nonfinite { font: 12px sans-serif; }
"""


def _table(study: StudyResult) -> str:
    left = {"optimizer", "rate", "remedy", "diverged"}
    head = "".join(f'<th class="{"l" if c in left else ""}">{escape(c)}</th>' for c in COLUMNS)
    rows = []
    previous: tuple[str, str] | None = None
    for cell in study.cells:
        classes = []
        if cell.diverged:
            classes.append("diverged")
        if previous is not None and previous != (cell.optimizer, cell.rate):
            classes.append("group")
        previous = (cell.optimizer, cell.rate)
        tds = "".join(
            f'<td class="{"l" if c in left else ""}">{escape(v)}</td>'
            for c, v in zip(COLUMNS, format_row(cell), strict=True)
        )
        rows.append(f'<tr class="{" ".join(classes)}" data-run="{cell.run_id}">{tds}</tr>')
    return f'<table id="results"><tr>{head}</tr>{"".join(rows)}</table>'


def _thresholds(study: StudyResult) -> str:
    rows = "".join(
        f'<tr><td class="l">{label(name)}</td><td>{t.global_norm:.4g}</td>'
        f"<td>{t.tensor_norm:.4g}</td><td>{t.value:.4g}</td><td>{t.warmup_steps}</td></tr>"
        for name, t in study.thresholds.items()
    )
    return (
        '<table id="thresholds"><tr><th class="l">optimizer</th><th>global_norm max_norm</th>'
        f"<th>by_norm max_norm</th><th>by_value limit</th><th>warm-up steps</th></tr>{rows}"
        "</table>"
    )


def _legend(study: StudyResult) -> str:
    items = "".join(
        f'<span><i style="background:{REMEDY_COLORS.get(r, "#888")}"></i>{escape(r)}</span>'
        for r in study.remedies
    )
    return f'<p class="legend">{items}</p>'


def _line(remedy: str, steps: Sequence[int], values: Sequence[float]) -> Line:
    # "none" is drawn wide and pale under the others: a remedy that never acts follows it.
    if remedy == "none":
        return Line(remedy, "#9a9a9a", steps, values, width=3.2)
    return Line(remedy, REMEDY_COLORS.get(remedy, "#888"), steps, values)


def _curves(study: StudyResult) -> str:
    out = []
    for optimizer in study.optimizers:
        for index, rate in enumerate(("low", "high")):
            cells = [c for c in study.cells if (c.optimizer, c.rate) == (optimizer, rate)]
            if not cells:
                continue
            lr = study.rates[optimizer][index]
            norms = [_line(c.remedy, c.curve.steps, c.curve.global_norm) for c in cells]
            losses = [_line(c.remedy, c.curve.steps, c.curve.loss) for c in cells]
            name = f"{label(optimizer)}, {rate} rate ({lr:g})"
            url = study.compare_urls.get(f"{optimizer}/{rate}")
            link = f' <a class="muted" href="{escape(url)}">compare view</a>' if url else ""
            norm_chart = line_chart(
                f"{name}: global norm (before the remedy)", norms, max_step=study.steps
            )
            loss_chart = line_chart(f"{name}: training loss", losses, max_step=study.steps)
            out.append(
                f'<section class="curves" id="curves-{optimizer}-{rate}"><h3>{escape(name)}'
                f'{link}</h3><div class="charts">{norm_chart}{loss_chart}</div></section>'
            )
    return "".join(out)


def _method(study: StudyResult) -> str:
    warmup = max((t.warmup_steps for t in study.thresholds.values()), default=0)
    percentile = next(iter(study.thresholds.values())).percentile if study.thresholds else 50.0
    return (
        "<ul>"
        f"<li>Thresholds: each optimizer first trains {warmup} steps unclipped at its low "
        f"rate; with P the {percentile:g}th percentile of that warm-up's norms, "
        "<code>global_norm</code> clips at P(global norm), <code>by_norm</code> at the "
        "largest layer's P(layer norm), <code>by_value</code> at "
        f"{VALUE_FACTOR:g}·P(global norm)/√(parameters). <code>zclip</code> and "
        "<code>autoclip</code> keep their defaults, with the same warm-up length.</li>"
        "<li>Diverged: a non-finite training loss, or a smoothed loss (trailing median of "
        f"{SMOOTHING_STEPS} steps) that ends above {DIVERGENCE_FACTOR:g}× the initial loss "
        "and stays there (the step is where that began), or a held-out loss after training "
        "that is non-finite or above that limit (the step is the last). Training stops when "
        "Keras' running mean of the loss becomes non-finite.</li>"
        "<li>Final loss: on held-out data after training. Time/step: wall time of a step "
        "(10th percentile over its steps) over that of the same optimizer's unclipped "
        "low-rate cell.</li>"
        f"<li>Cost/help at the low rate: held-out loss more than {COST_TOLERANCE:.0%} above/"
        "below the unclipped run's.</li>"
        "</ul>"
    )


def render_page(study: StudyResult) -> str:
    """The report as one HTML document."""
    summary = "".join(f"<li>{escape(s)}</li>" for s in study.summary)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>gradwatch clipping study: {escape(study.problem)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>gradwatch clipping study: {escape(study.problem)}</h1>"
        f'<p class="muted">{escape(study.description)}. {study.steps} steps per cell, '
        f"seed {study.seed}.<br>Command: <code>{escape(study.command)}</code></p>"
        f'<h2>Summary</h2><ul id="summary">{summary}</ul>'
        f"<h2>Results</h2>{_table(study)}"
        f"<h2>Thresholds from the warm-up</h2>{_thresholds(study)}"
        f"<h2>Curves</h2>{_legend(study)}{_curves(study)}"
        f"<h2>Method</h2>{_method(study)}"
        "</body></html>\n"
    )


def write_page(study: StudyResult, path: Path) -> Path:
    """Write :func:`render_page` to ``path`` (UTF-8); blocks on the write. Returns ``path``."""
    path.write_text(render_page(study), encoding="utf-8")
    return path
