"""``gradwatch runs``: the runs table (or JSON), newest first, with each run's health verdict."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .client import (
    DEFAULT_SERVER,
    ApiClient,
    ServerOption,
    TimeoutOption,
    TokenOption,
)
from .exits import report_errors
from .format import format_age, format_number, verdict_text

__all__ = ["RunStatusChoice", "runs"]


class RunStatusChoice(StrEnum):
    """A run's status, as ``GET /api/v1/runs?status=`` filters it."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


def runs(
    project: Annotated[
        str | None, typer.Option(metavar="PROJECT", help="Only runs of this project.")
    ] = None,
    status: Annotated[
        RunStatusChoice | None, typer.Option(help="Only runs with this status.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Only runs whose name contains NAME (any case)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, metavar="N", help="Most runs listed.")] = 20,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print a JSON list of the runs (each with its verdict and url)."
        ),
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List runs, newest first: steps, last step, health verdict, norms, clipped steps.

    The id column shows the first 8 characters of each run id: enough for show, check and
    open, which accept a unique id prefix (or a run name).
    """
    with report_errors("runs"), ApiClient(server, token, timeout) as client:
        listed = client.list_runs(
            project=project,
            status=None if status is None else status.value,
            name=name,
            limit=limit,
        )
        verdicts = {
            run["run_id"]: run.get("verdict") or client.health(run["run_id"])["verdict"]
            for run in listed
        }
        rows = [
            {**run, "verdict": verdicts[run["run_id"]], "url": client.run_url(run["run_id"])}
            for run in listed
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    if not rows:
        console.print(f"no runs on {client.server} match", highlight=False)
        return
    console.print(_table(rows, console.width))


_DROP_ORDER = ("skipped", "project", "clipped", "last step", "status")
"""Columns left out, in this order, while the table is wider than the terminal."""
_RIGHT = {"steps", "max norm", "clipped", "skipped", "non-finite"}


def _table(rows: list[dict[str, Any]], width: int) -> Table:
    """The runs table, leaving out the least useful columns on a narrow terminal."""
    columns: dict[str, list[str | Text]] = {
        "id": [str(run["run_id"])[:8] for run in rows],
        "name": [str(run["name"]) for run in rows],
        "project": [str(run["project"]) for run in rows],
        "status": [str(run["status"]) for run in rows],
        "steps": [format_number(run["num_steps"]) for run in rows],
        "last step": [_last_step(run) for run in rows],
        "health": [verdict_text(str(run["verdict"]), str(run["verdict"])) for run in rows],
        "max norm": [format_number(run["max_global_norm"]) for run in rows],
        "clipped": [format_number(run["clipped_steps"]) for run in rows],
        "skipped": [format_number(run["skipped_steps"]) for run in rows],
        "non-finite": [format_number(run["nonfinite_steps"]) for run in rows],
    }
    for heading in _DROP_ORDER:
        if _width(columns) <= width:
            break
        del columns[heading]
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for heading in columns:
        table.add_column(
            heading,
            justify="right" if heading in _RIGHT else "left",
            no_wrap=heading != "name",
            style="dim" if heading == "id" else None,
        )
    for index in range(len(rows)):
        table.add_row(*(cells[index] for cells in columns.values()))
    return table


def _width(columns: dict[str, list[str | Text]]) -> int:
    return sum(
        max(len(heading), *(len(cell) for cell in cells)) + 2 for heading, cells in columns.items()
    )


def _last_step(run: dict[str, Any]) -> str:
    if run["last_step"] is None:
        return "-"
    return f"{run['last_step']} ({format_age(run['last_ingest_at'])})"
