"""The study's table: one row per cell, as text (shared by the terminal and the HTML report).

Columns: optimizer, rate (learning rate), remedy, final loss (held-out), diverged (at which
step), clipped and skipped steps (of the steps trained), wall time per step relative to the
same optimizer's unclipped low-rate cell. Pure formatting, plus :func:`rich_table` for the
terminal.
"""

from __future__ import annotations

import math

from rich import box
from rich.table import Table

from .result import CellResult, StudyResult
from .summary import label

__all__ = ["COLUMNS", "format_row", "rich_table"]

COLUMNS = (
    "optimizer",
    "rate",
    "remedy",
    "final loss",
    "diverged",
    "clipped",
    "skipped",
    "time/step",
)
"""Column headings, in order."""


def _loss(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def format_row(cell: CellResult) -> tuple[str, ...]:
    """The cell's row, one string per column of :data:`COLUMNS`."""
    diverged = f"step {cell.diverged_at}" if cell.diverged else "no"
    relative = (
        f"×{cell.relative_time:.2f}"
        if cell.relative_time is not None and math.isfinite(cell.relative_time)
        else "—"
    )
    return (
        label(cell.optimizer),
        f"{cell.rate} {cell.learning_rate:g}",
        cell.remedy,
        _loss(cell.final_loss),
        diverged,
        f"{cell.clipped_steps}/{cell.steps}",
        f"{cell.skipped_steps}/{cell.steps}",
        relative,
    )


def rich_table(study: StudyResult) -> Table:
    """The table for the terminal; diverged rows in red, others as they are."""
    table = Table(
        title=f"gradwatch study: {study.problem} ({study.steps} steps per cell)",
        box=box.SIMPLE_HEAD,
    )
    for column in COLUMNS:
        left = column in ("optimizer", "rate", "remedy", "diverged")
        table.add_column(column, justify="left" if left else "right")
    cells = study.cells
    for index, cell in enumerate(cells):
        following = cells[index + 1] if index + 1 < len(cells) else None
        last_of_group = following is None or (following.optimizer, following.rate) != (
            cell.optimizer,
            cell.rate,
        )
        table.add_row(
            *format_row(cell), style="red" if cell.diverged else None, end_section=last_of_group
        )
    return table
