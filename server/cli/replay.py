"""``gradwatch replay BUNDLE``: run an incident bundle's bad step again and say what broke.

The work is :func:`gradwatch.agent.replay.replay` (TensorFlow, imported only when the command
runs); this module prints its report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..history import history_line
from .exits import CliError, ExitCode, report_errors
from .format import INCIDENT_CAUSES

if TYPE_CHECKING:
    from gradwatch.agent.replay import ReplayReport
    from gradwatch.agent.replay_roll import RolledForward

__all__ = ["replay", "rolled_line"]


def replay(
    bundle: Annotated[
        Path,
        typer.Argument(
            metavar="BUNDLE",
            help="An incident bundle's directory (printed by the monitor when it wrote it).",
        ),
    ],
    model_fn: Annotated[
        str | None,
        typer.Option(
            "--model-fn",
            metavar="MODULE:FUNCTION",
            help="Builds the model (needed for custom layers or subclassed models); imported "
            "from the current directory too.",
        ),
    ] = None,
) -> None:
    """Replay the bad step of an incident bundle: first NaN/Inf op, layer norms, remedies."""
    with report_errors("replay"):
        _replay(bundle, model_fn)


def _replay(bundle: Path, model_fn: str | None) -> None:
    try:
        from gradwatch.agent.replay import BundleError
        from gradwatch.agent.replay import replay as run_replay
    except ImportError as error:
        raise CliError(
            f"replay needs TensorFlow: pip install 'gradwatch[tensorflow]' ({error})",
            ExitCode.USAGE,
        ) from None
    try:
        report = run_replay(bundle, model_fn)
    except BundleError as error:
        raise CliError(str(error), ExitCode.USAGE) from None
    _print(report)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def rolled_line(rolled: RolledForward) -> str:
    """How a rolling bundle's state was brought to the bad step, and whether it matched."""
    ran = f"{rolled.steps} step{'s' if rolled.steps != 1 else ''}"
    head = (
        f"rolled forward {ran} from step {rolled.from_step} (under XLA the state before a "
        f"step is copied every {rolled.every} steps)"
    )
    difference = rolled.largest_difference
    if rolled.steps == 0:
        return f"{head}: the copy is the bad step's own"
    if difference is None:
        return f"{head}: no recorded norms to compare them with"
    if difference <= 1e-4:
        return (
            f"{head}: their global norms equal the recorded ones (largest relative "
            f"difference {difference:.2g})"
        )
    return (
        f"{head}: their global norms differ from the recorded ones by up to {difference:.1e} "
        f"(relative): the replayed state is not exactly the trained one"
    )


def _print(report: ReplayReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    verdict = "yes" if report.reproduced else "no"
    group = "" if report.group is None else f" of group {report.group}"
    why = INCIDENT_CAUSES.get(report.cause, report.cause)
    if report.position is not None:
        why += f"; epoch {report.position['epoch']}, step {report.position['step_in_epoch']} of it"
    console.print(
        f"step {report.step}{group} ({why}), replayed from {report.bundle}\n"
        f"reproduced: {verdict}; global norm {_number(report.global_norm)} "
        f"(recorded {_number(report.recorded_global_norm)})"
    )
    if report.replicas > 1 and report.sharded:
        console.print(
            f"captured on {report.replicas} replicas (tf.distribute), replayed shard by shard "
            "on one device from the captured state (each replica's batch and dropout masks), "
            "the shards' gradients averaged as the all-reduce did",
            highlight=False,
        )
    elif report.replicas > 1:
        console.print(
            f"captured on {report.replicas} replicas (tf.distribute), replayed on one device "
            "with their global batch, which does not cut into equal shards: the all-reduced "
            "gradient is one device's, up to the replicas' random draws",
            highlight=False,
        )
    rolled = report.rolled
    if rolled is not None:
        console.print(rolled_line(rolled), highlight=False)
    steps = report.accumulation_steps
    if steps:
        console.print(
            f"gradient accumulation: the step averaged {steps} micro-batches; replayed: its "
            f"last (the bundle's batch) plus the summed gradient of the {steps - 1} before it "
            f"(the optimizer's accumulators)",
            highlight=False,
        )
    for name, count in report.accumulated_nonfinite.items():
        console.print(
            f"the earlier micro-batches' gradient already holds {count} NaN/Inf value(s) in "
            f"{name}: the fault is in one of them (the bundle holds the last only)",
            highlight=False,
        )
    for label, history in (
        ("learning rate", report.learning_rate),
        ("loss scale", report.loss_scale),
    ):
        line = history_line(label, history)
        if line is not None:
            console.print(line, highlight=False)
    for name, count in report.batch_nonfinite.items():
        # markup=False: ``x[b]`` names an input, not rich's bold tag
        console.print(f"the batch itself holds {count} NaN/Inf value(s) in {name}", markup=False)
    bad = report.first_bad_op
    if bad is None:
        console.print("first NaN/Inf: none (every operation of the step stayed finite)")
    else:
        where = (
            f"in layer {bad.layer}"
            if bad.layer
            else "outside any layer's call (backpropagation or the train step's own code)"
        )
        console.print(f"first NaN/Inf: op {bad.op} {where}", highlight=False, markup=False)
        if bad.frame:
            console.print(f"  at {bad.frame}", highlight=False)
        if bad.code:
            console.print(f"    {bad.code}", highlight=False)
    table = Table("layer", "replayed", "float64", "recorded", "non-finite values", "max |g|")
    for layer in report.layers:
        table.add_row(
            layer.layer,
            _number(layer.replayed),
            _number(layer.replayed_float64),
            _number(layer.recorded),
            str(layer.nonfinite),
            _number(layer.max_abs),
        )
    console.print(table)
    remedies = Table("remedy", "threshold", "finite", "global norm after", "why")
    for remedy in report.remedies:
        remedies.add_row(
            remedy.name,
            _number(remedy.threshold),
            "yes" if remedy.finite else "no",
            _number(remedy.global_norm),
            remedy.note,
        )
    console.print(remedies)
