"""``gradwatch show RUN``: one run's totals, health, worst layers, last events and norm curve."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .client import (
    DEFAULT_SERVER,
    ApiClient,
    RunArgument,
    ServerOption,
    TimeoutOption,
    TokenOption,
)
from .exits import report_errors
from .format import (
    INCIDENT_CAUSES,
    INF_MARK,
    NAN_MARK,
    describe_health,
    format_age,
    format_number,
    format_time,
    sparkline,
    verdict_text,
)

__all__ = ["render", "show"]

_MIN_CELLS = 10


def show(
    run: RunArgument,
    events: Annotated[
        int, typer.Option(min=0, max=1000, metavar="N", help="Newest events listed.")
    ] = 5,
    worst: Annotated[
        int, typer.Option(min=0, max=100, metavar="N", help="Layers with most detections listed.")
    ] = 5,
    width: Annotated[
        int | None,
        typer.Option(
            min=_MIN_CELLS,
            max=10_000,
            metavar="N",
            help="Cells of the global-norm sparkline; default the terminal width.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object: run, health, events, global_norm (the series), url.",
        ),
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Show a run: totals, health verdict, worst layers, last events and its global norm."""
    console = Console()
    cells = width or max(_MIN_CELLS, console.width - 2)
    with report_errors("show"), ApiClient(server, token, timeout) as client:
        found = client.resolve_run(run)
        run_id = str(found["run_id"])
        details = {
            "run": found,
            "health": client.health(run_id, worst=worst),
            "events": client.events(run_id, limit=events) if events else [],
            "global_norm": client.series(run_id, "global_norm", max_points=cells),
            "url": client.run_url(run_id),
        }
    if as_json:
        typer.echo(json.dumps(details, indent=2))
        return
    console.print(render(details), soft_wrap=False)


def render(details: dict[str, Any]) -> Group:
    """The terminal view of ``show``'s JSON object."""
    run, health = details["run"], details["health"]
    verdict = str(health["verdict"])
    title = Text.assemble((str(run["name"]), "bold"), "  ", (str(run["run_id"]), "dim"))
    state = Text.assemble(
        f"project {run['project']} · {run['status']} · health ",
        verdict_text(describe_health(health), verdict),
    )
    last = "no steps yet"
    if run["last_step"] is not None:
        last = (
            f"last step {run['last_step']} at {format_time(run['last_ingest_at'])} "
            f"({format_age(run['last_ingest_at'])})"
        )
    totals = Text(
        f"steps {format_number(run['num_steps'])} · {last} · layers {run['num_layers']}\n"
        f"max global norm {format_number(run['max_global_norm'])} · "
        f"clipped {run['clipped_steps']} · skipped {run['skipped_steps']} · "
        f"non-finite steps {run['nonfinite_steps']} ({run['nonfinite_values']} values)"
    )
    parts: list[Any] = [title, state, totals]
    if health.get("onset"):
        parts.append(Text(f"onset: {health['onset']}"))
    parts.extend(_incident(item) for item in health.get("incidents") or [])
    parts.append(Text())
    parts.extend(_norm_chart(details["global_norm"], run["last_step"]))
    if health["worst_layers"]:
        parts.append(_worst_layers(health["worst_layers"]))
    if details["events"]:
        parts.append(_events(details["events"]))
    elif run["num_steps"]:
        parts.append(Text("no detector events"))
    parts.append(Text(f"run page: {details['url']}"))
    return Group(*parts)


def _incident(item: dict[str, Any]) -> Text:
    """One incident bundle: which step, why, where it lies and the command that replays it."""
    size = f"{item['bytes'] / 2**20:.1f} MiB"
    lines = [item.get("learning_rate_history"), item.get("loss_scale_history")]
    steps = (item.get("recorded") or {}).get("step") or []
    where = "around it" if steps and steps[-1] > item["step"] else "before it"
    before = "".join(f"\n  {where}: {line}" for line in lines if line)
    return Text.assemble(
        ("incident bundle", "bold"),
        f": step {item['step']} ({INCIDENT_CAUSES.get(item['cause'], item['cause'])}), "
        f"on {item['host'] or 'the training host'} at {item['path']} ({size}); "
        f"replay there: ",
        (str(item["replay"]), "bold"),
        before,
    )


def _norm_chart(series: dict[str, Any], last_step: int | None) -> list[Text]:
    line = sparkline(series)
    if line is None:
        return [Text("global norm: no data yet", style="dim"), Text()]
    scale = "log scale" if line.log_scale else "linear scale"
    per_cell = (
        f"max of {line.steps_per_cell} steps per cell" if line.steps_per_cell > 1 else "per step"
    )
    end = line.last_step if last_step is None else min(line.last_step, last_step)
    heading = Text(
        f"global gradient norm, steps {line.first_step}–{end} ({per_cell}, {scale}; "
        f"{INF_MARK} +Inf, {NAN_MARK} NaN)",
        style="bold",
    )
    legend = Text(f"min {format_number(line.low)}  max {format_number(line.high)}", style="dim")
    return [heading, line.text, legend, Text()]


def _worst_layers(layers: list[dict[str, Any]]) -> Table:
    table = Table(title="layers with most detections", title_justify="left")
    table.add_column("layer", overflow="fold")
    for heading in ("detections", "events"):
        table.add_column(heading, justify="right")
    table.add_column("worst")
    for heading in ("latest norm", "max norm", "non-finite values"):
        table.add_column(heading, justify="right")
    for layer in layers:
        severity = str(layer["worst_severity"])
        table.add_row(
            str(layer["layer"]),
            format_number(layer["detections"]),
            format_number(layer["events"]),
            verdict_text(severity, severity),
            format_number(layer["latest_grad_norm"]),
            format_number(layer["max_grad_norm"]),
            format_number(layer["nonfinite_values"]),
        )
    return table


def _events(events: list[dict[str, Any]]) -> Table:
    table = Table(title="last events", title_justify="left")
    table.add_column("steps", justify="right")
    table.add_column("rule")
    table.add_column("severity")
    table.add_column("layer", overflow="fold")
    for heading in ("detections", "value", "baseline"):
        table.add_column(heading, justify="right")
    for event in events:
        severity = str(event["severity"])
        first, last = event["first_step"], event["last_step"]
        table.add_row(
            str(first) if first == last else f"{first}–{last}",
            str(event["rule"]),
            verdict_text(severity, severity),
            "(run)" if event["layer"] is None else str(event["layer"]),
            format_number(event["count"]),
            format_number(event["value"]),
            format_number(event["baseline"]),
        )
    return table
