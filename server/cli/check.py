"""``gradwatch check RUN``: a gate for CI pipelines and schedulers, by exit code.

Exit 0 when the run passes, 1 when it fails the check, with one line saying why on stdout;
2 for a usage or configuration error (unknown run, refused token, bad URL) and 3 when the
server cannot be reached, with the error on stderr.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any

import typer

from .client import (
    DEFAULT_SERVER,
    ApiClient,
    RunArgument,
    ServerOption,
    TimeoutOption,
    TokenOption,
)
from .exits import ExitCode, report_errors
from .format import as_float, describe_health, format_number

__all__ = ["FailOn", "check", "judge"]


class FailOn(StrEnum):
    """The lowest health verdict that fails the check."""

    WARNING = "warning"
    CRITICAL = "critical"


_RANK = {"healthy": 0, "warning": 1, "critical": 2}


def check(
    run: RunArgument,
    fail_on: Annotated[
        FailOn, typer.Option(help="Fail from this health verdict up.")
    ] = FailOn.CRITICAL,
    max_global_norm: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="Also fail when the run's largest global norm exceeds X (or is NaN).",
        ),
    ] = None,
    no_data_fails: Annotated[
        bool,
        typer.Option("--no-data-fails", help="Fail a run that has stored no step yet."),
    ] = False,
    whole_run: Annotated[
        bool,
        typer.Option(
            "--whole-run",
            help="Judge detections anywhere in the run, not only those reaching its last "
            "--recent-steps steps (the server's verdict).",
        ),
    ] = False,
    recent_steps: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="Steps back from the last one the verdict covers."),
    ] = 1000,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Exit 0 when the run is healthy enough, 1 (with the reason) when it is not.

    For CI: gradwatch check RUN && deploy. Exit 2 is a usage or configuration error
    (unknown run, refused token, bad URL), 3 an unreachable server.
    """
    with report_errors("check"), ApiClient(server, token, timeout) as client:
        found = client.resolve_run(run)
        health = client.health(str(found["run_id"]), recent_steps=recent_steps, worst=0)
    reasons, summary = judge(
        found,
        health,
        fail_on=fail_on,
        max_global_norm=max_global_norm,
        no_data_fails=no_data_fails,
        recent_steps=None if whole_run else recent_steps,
    )
    label = f"{found['name']} ({found['run_id']})"
    if reasons:
        typer.echo(f"check failed: {label}: {'; '.join(reasons)}")
        raise typer.Exit(code=int(ExitCode.CHECK_FAILED))
    typer.echo(f"ok: {label}: {summary}")


def judge(
    run: dict[str, Any],
    health: dict[str, Any],
    *,
    fail_on: FailOn,
    max_global_norm: float | None,
    no_data_fails: bool,
    recent_steps: int | None,
) -> tuple[list[str], str]:
    """The reasons the run fails (empty: it passes) and a summary of what was judged.

    ``recent_steps`` is the window the server's verdict covered, or None to judge every
    detection of the run instead.
    """
    steps = int(run["num_steps"])
    if steps == 0:
        if no_data_fails:
            return ["no data: the run has stored no step yet"], ""
        return [], "no data yet (pass --no-data-fails to fail such runs)"
    reasons: list[str] = []
    verdict = str(health["verdict"]) if recent_steps else _worst_detected(health)
    described = describe_health({**health, "verdict": verdict})
    if _RANK[verdict] >= _RANK[fail_on.value]:
        where = f"in the last {recent_steps} steps" if recent_steps else "in the run"
        fired = described.partition(": ")[2]
        detail = f"; detections so far: {fired}" if fired else ""
        reasons.append(f"health {verdict} {where}{detail}{_last_event(health)}")
    largest = as_float(run["max_global_norm"])
    too_large = largest is not None and (math.isnan(largest) or largest > (max_global_norm or 0))
    if max_global_norm is not None and too_large:
        reasons.append(
            f"max global norm {format_number(largest)} > {format_number(max_global_norm)}"
        )
    summary = f"{described}, {steps} steps, max global norm {format_number(run['max_global_norm'])}"
    return reasons, summary


def _worst_detected(health: dict[str, Any]) -> str:
    worst = "healthy"
    for by_severity in health["detections"].values():
        for severity, count in by_severity.items():
            if count and _RANK.get(severity, 0) > _RANK[worst]:
                worst = severity
    return worst


def _last_event(health: dict[str, Any]) -> str:
    event = health.get("last_event")
    if not event:
        return ""
    first, last = event["first_step"], event["last_step"]
    steps = f"step {first}" if first == last else f"steps {first}–{last}"
    layer = "" if event["layer"] is None else f" on {event['layer']}"
    return f"; last event: {event['severity']} {event['rule']}{layer} at {steps}"
