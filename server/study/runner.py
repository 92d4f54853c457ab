"""Run a whole study: warm-ups, then every cell, read back from the gradwatch server.

Everything the report says about a run's gradients (norms, clipped and skipped steps, the
per-step loss) is what gradwatch recorded and the server stores: the runner reads it back
over the REST API (``/runs/{id}``, ``/series``, ``/layers``), as any other client would.
Only the held-out loss and the wall time per step are measured on the training side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gradwatch.wire import decode_float

from ..cli.client import ApiClient
from .divergence import find_divergence
from .plan import StudyPlan
from .result import CellResult, Curve, StudyResult
from .summary import summarise
from .threshold import Thresholds, choose_thresholds

if TYPE_CHECKING:
    from .train import Trained

__all__ = ["PROJECT", "Listener", "run_study"]

PROJECT = "study"
"""The project of every run a study sends."""

_PAGE = 10_000
"""Largest raw page of ``GET …/series``."""


class Listener(Protocol):
    """What the runner tells its caller (the CLI's progress bars). Called on one thread."""

    def begin(self, label: str, steps: int) -> None:
        """A run of ``steps`` steps starts."""

    def step(self) -> None:
        """One training step is done."""

    def end(self) -> None:
        """The run is trained and read back."""

    def warn(self, message: str) -> None:
        """Something the user should know (a run whose batches did not all arrive)."""


def _raw_series(client: ApiClient, run_id: str, metric: str, layer: str | None = None) -> Any:
    steps: list[int] = []
    values: list[float] = []
    start: int | None = None
    while True:
        page = client.get(
            f"/api/v1/runs/{run_id}/series",
            {"metric": metric, "layer": layer, "raw": "true", "max_points": _PAGE, "start": start},
        )
        steps.extend(int(s) for s in page["step"])
        values.extend(decode_float(v) if v is not None else float("nan") for v in page["value"])
        start = page.get("next_start")
        if start is None:
            return steps, values


def _aligned(steps: Sequence[int], series: tuple[list[int], list[float]]) -> tuple[float, ...]:
    by_step = dict(zip(*series, strict=True))
    return tuple(by_step.get(step, float("nan")) for step in steps)


def _curve(client: ApiClient, run_id: str) -> Curve:
    norm = _raw_series(client, run_id, "global_norm")
    loss = _raw_series(client, run_id, "loss")
    steps = sorted(set(norm[0]) | set(loss[0]))
    return Curve(tuple(steps), _aligned(steps, norm), _aligned(steps, loss))


def _check_delivery(trained: Trained, name: str, listener: Listener) -> None:
    if not trained.delivered:
        listener.warn(f"{name}: not every batch reached the server; its curves have gaps")


def _warm_up(
    plan: StudyPlan, optimizer: str, client: ApiClient, token: str | None, listener: Listener
) -> Thresholds:
    from .train import train

    name = f"study-{plan.problem.name}-{optimizer}-warmup"
    listener.begin(name, plan.warmup_steps)
    trained = train(
        plan.problem.build,
        seed=plan.seed,
        run_name=name,
        server=client.server,
        token=token,
        project=PROJECT,
        optimizer=optimizer,
        learning_rate=plan.rates[optimizer][0],
        policy=None,
        steps=plan.warmup_steps,
        on_step=listener.step,
    )
    _check_delivery(trained, name, listener)
    global_norms = _raw_series(client, trained.run_id, "global_norm")[1]
    layers = client.get(f"/api/v1/runs/{trained.run_id}/layers")["layers"]
    layer_norms = {
        layer["name"]: _raw_series(client, trained.run_id, "grad_norm", layer["name"])[1]
        for layer in layers
    }
    listener.end()
    return choose_thresholds(global_norms, layer_norms, trained.num_parameters, plan.percentile)


def _cell(
    plan: StudyPlan,
    optimizer: str,
    remedy: str,
    rate: str,
    thresholds: Thresholds,
    client: ApiClient,
    token: str | None,
    listener: Listener,
) -> CellResult:
    from .train import make_policy, train

    learning_rate = plan.rates[optimizer][0 if rate == "low" else 1]
    name = f"study-{plan.problem.name}-{optimizer}-{rate}-{remedy}"
    policy = make_policy(remedy, thresholds)
    listener.begin(name, plan.steps)
    trained = train(
        plan.problem.build,
        seed=plan.seed,
        run_name=name,
        server=client.server,
        token=token,
        project=PROJECT,
        optimizer=optimizer,
        learning_rate=learning_rate,
        policy=policy,
        steps=plan.steps,
        on_step=listener.step,
    )
    _check_delivery(trained, name, listener)
    run = client.run(trained.run_id)
    curve = _curve(client, trained.run_id)
    listener.end()
    return CellResult(
        optimizer=optimizer,
        remedy=remedy,
        rate=rate,
        learning_rate=learning_rate,
        run_id=trained.run_id,
        run_name=name,
        policy=policy.describe() if policy is not None else None,
        steps=trained.steps,
        planned_steps=plan.steps,
        final_loss=trained.final_loss,
        diverged_at=find_divergence(curve.steps, curve.loss, trained.final_loss),
        clipped_steps=int(run["clipped_steps"]),
        skipped_steps=int(run["skipped_steps"]),
        seconds_per_step=trained.seconds_per_step,
        curve=curve,
    )


def _with_relative_times(cells: list[CellResult]) -> list[CellResult]:
    base = {c.optimizer: c.seconds_per_step for c in cells if (c.remedy, c.rate) == ("none", "low")}
    out = []
    for cell in cells:
        reference = base.get(cell.optimizer)
        ratio = cell.seconds_per_step / reference if reference else None
        out.append(dataclasses.replace(cell, relative_time=ratio))
    return out


def _compare_urls(server: str, cells: Sequence[CellResult]) -> dict[str, str]:
    """Per optimizer and rate, the web UI's compare view of its runs (2–8 runs per view)."""
    groups: dict[str, list[str]] = {}
    for cell in cells:
        groups.setdefault(f"{cell.optimizer}/{cell.rate}", []).append(cell.run_id)
    return {
        key: f"{server}/compare?runs={','.join(ids[:8])}"
        for key, ids in groups.items()
        if len(ids) >= 2
    }


def run_study(
    plan: StudyPlan, client: ApiClient, token: str | None, listener: Listener
) -> StudyResult:
    """Train every warm-up and cell of ``plan`` against ``client``'s server, in order.

    Blocks until all runs are trained and read back (minutes: see the README for the
    sizes). Each optimizer's warm-up comes first and sets its cells' thresholds.

    Raises:
        CliError: The server cannot be reached or refuses the token.
        ValueError: A warm-up recorded no usable norm (a model whose gradient is zero).
    """
    from .train import make_deterministic

    make_deterministic()
    thresholds: dict[str, Thresholds] = {}
    cells: list[CellResult] = []
    for optimizer in plan.optimizers:
        thresholds[optimizer] = _warm_up(plan, optimizer, client, token, listener)
        for rate in ("low", "high"):
            for remedy in plan.remedies:
                cells.append(
                    _cell(
                        plan,
                        optimizer,
                        remedy,
                        rate,
                        thresholds[optimizer],
                        client,
                        token,
                        listener,
                    )
                )
    study = StudyResult(
        problem=plan.problem.name,
        description=plan.problem.description,
        command=plan.command,
        seed=plan.seed,
        steps=plan.steps,
        optimizers=plan.optimizers,
        remedies=plan.remedies,
        rates={name: plan.rates[name] for name in plan.optimizers},
        thresholds=thresholds,
        cells=tuple(_with_relative_times(cells)),
        server=client.server,
        compare_urls=_compare_urls(client.server, cells),
    )
    return dataclasses.replace(study, summary=summarise(study))
