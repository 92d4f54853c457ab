"""``gradwatch study``: the clipping study, on a built-in problem or the user's own model.

Trains every optimizer × remedy × learning rate cell, streams each run to a gradwatch server
(an embedded one unless ``--server``), then prints the table, the generated summary and the
web UI's compare URLs, and writes ``study.json`` and ``report.html`` to ``--out``. The study
itself lives in :mod:`gradwatch.server.study`; this module parses options and talks to the
user.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .client import ApiClient
from .exits import CliError, ExitCode, report_errors
from .training import (
    EmbeddedDatabaseOption,
    TrainingServerOption,
    TrainingTokenOption,
    serve_until_interrupted,
    training_server,
)

if TYPE_CHECKING:
    from ..study.plan import StudyPlan
    from ..study.result import StudyResult

__all__ = ["study"]


class _Bars:
    """The runner's :class:`~gradwatch.server.study.runner.Listener`: two rich bars."""

    def __init__(self, progress: Progress, total_runs: int, console: Console) -> None:
        self._progress = progress
        self._console = console
        self._all = progress.add_task("runs", total=total_runs)
        self._run: Any = None

    def begin(self, label: str, steps: int) -> None:
        self._run = self._progress.add_task(label, total=steps)

    def step(self) -> None:
        self._progress.advance(self._run)

    def end(self) -> None:
        self._progress.remove_task(self._run)
        self._progress.advance(self._all)

    def warn(self, message: str) -> None:
        self._console.print(f"[yellow]{message}", highlight=False)


def _plan(
    problem: str,
    model: str | None,
    optimizers: str,
    remedies: str,
    rates: str | None,
    steps: int | None,
    warmup_steps: int,
    percentile: float,
    seed: int,
) -> StudyPlan:
    from ..study.plan import OPTIMIZERS, REMEDIES, PlanError, StudyPlan, parse_names, parse_rates
    from ..study.problem import ProblemError, load_problem

    try:
        chosen = load_problem(problem, model)
        return StudyPlan(
            problem=chosen,
            optimizers=parse_names(optimizers, OPTIMIZERS, "--optimizers"),
            remedies=parse_names(remedies, REMEDIES, "--remedies"),
            rates=parse_rates(rates, chosen.rates),
            steps=steps if steps is not None else chosen.steps,
            warmup_steps=warmup_steps,
            percentile=percentile,
            seed=seed,
            command=shlex.join(["gradwatch", *sys.argv[1:]]),
        )
    except (PlanError, ProblemError) as error:
        raise CliError(str(error), ExitCode.USAGE) from None


def _report(study: StudyResult, out: Path, console: Console, embedded: bool) -> None:
    from ..study.page import write_page
    from ..study.result import write_json
    from ..study.table import rich_table

    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(study, out / "study.json")
    html_path = write_page(study, out / "report.html")
    console.print(rich_table(study))
    console.print("[bold]Summary[/bold]")
    for sentence in study.summary:
        console.print(f"  • {sentence}", highlight=False)
    console.print(f"Report: {html_path}\nResults: {json_path}", highlight=False, soft_wrap=True)
    console.print("Compare view in the web UI, per optimizer and rate:", highlight=False)
    for key, url in study.compare_urls.items():
        console.print(f"  {key:<14}{url}", highlight=False, soft_wrap=True)
    if embedded:
        console.print(
            "[yellow]These URLs stop working when the study ends[/yellow] (its embedded server "
            "stops with it): run with --keep-serving to keep them up until Ctrl-C, or "
            "--database-url to keep the runs for a later `gradwatch server`.",
            highlight=False,
        )


def run_study_command(
    plan: StudyPlan,
    out: Path,
    server: str | None,
    token: str | None,
    database_url: str | None,
    keep_serving: bool,
) -> StudyResult:
    """Run ``plan`` against ``server`` (or an embedded one) and report it.

    Blocks until every run is trained and the report is written (and, with
    ``keep_serving``, until interrupted).

    Raises:
        CliError: The server is unreachable (3) or refuses the token (2); the user's
            ``--model`` function broke its contract (2).
    """
    from ..study.problem import ProblemError
    from ..study.runner import run_study

    console = Console()
    try:
        with (
            training_server(server, database_url, "study", console) as target,
            ApiClient(target.url, token, timeout_seconds=30.0) as client,
        ):
            client.get("/healthz")
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
                bars = _Bars(progress, plan.num_runs, console)
                try:
                    result = run_study(plan, client, token, bars)
                except ProblemError as error:
                    raise CliError(str(error), ExitCode.USAGE) from None
            _report(result, out, console, target.embedded and not keep_serving)
            if target.embedded and keep_serving:
                serve_until_interrupted(console)
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    return result


def study(
    problem: Annotated[
        str, typer.Option(metavar="rnn|mlp", help="Built-in problem: a deep RNN or a deep MLP.")
    ] = "rnn",
    model: Annotated[
        str | None,
        typer.Option(
            metavar="MODULE:FUNCTION",
            help="Your own model and data instead of --problem: FUNCTION(seed) returns a "
            "dict with model (new, uncompiled keras.Model), x, y and optionally x_val, "
            "y_val, loss, batch_size (README, 'What clipping does').",
        ),
    ] = None,
    optimizers: Annotated[
        str, typer.Option(metavar="LIST", help="Comma-separated: sgd, adagrad, rmsprop, adam.")
    ] = "sgd,adagrad,rmsprop,adam",
    remedies: Annotated[
        str,
        typer.Option(
            metavar="LIST",
            help="Comma-separated: none, by_value, by_norm, global_norm, zclip, autoclip.",
        ),
    ] = "none,by_value,by_norm,global_norm,zclip,autoclip",
    rates: Annotated[
        str | None,
        typer.Option(
            metavar="OPT=LOW:HIGH,...",
            help="Learning rates per optimizer, e.g. sgd=0.01:0.1 (others keep the "
            "problem's defaults).",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=10, metavar="N", help="Training steps per cell (default: the problem's)."),
    ] = None,
    warmup_steps: Annotated[
        int,
        typer.Option(
            min=5, metavar="N", help="Unclipped warm-up steps per optimizer for the thresholds."
        ),
    ] = 10,
    percentile: Annotated[
        float,
        typer.Option(
            min=1.0, max=100.0, metavar="P", help="Percentile of the warm-up norms (thresholds)."
        ),
    ] = 50.0,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of every run.")] = 0,
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", help="Where study.json and report.html are written."),
    ] = Path("gradwatch-study"),
    server: TrainingServerOption = None,
    token: TrainingTokenOption = None,
    database_url: EmbeddedDatabaseOption = None,
    keep_serving: Annotated[
        bool,
        typer.Option("--keep-serving", help="Keep the embedded server up after the study."),
    ] = False,
) -> None:
    """Compare clipping remedies and optimizers at a stable and an exploding learning rate.

    Ends with a table of the cells, a generated summary and the web UI's compare URLs.
    Writes study.json and report.html (tables, summary, curves) to --out.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    try:
        import keras  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the study needs TensorFlow: pip install 'gradwatch[all]'", param_hint="study"
        ) from None
    with report_errors("study"):
        plan = _plan(
            problem, model, optimizers, remedies, rates, steps, warmup_steps, percentile, seed
        )
        run_study_command(plan, out, server, token, database_url, keep_serving)
