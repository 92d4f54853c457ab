"""Pydantic models of detector events, run health and incident bundles (requests and replies).

Split from :mod:`gradwatch.server.schemas` (the batch, run and series models) to keep each
module small; the conventions are the same: immutable once validated, non-finite floats
written as ``"NaN"``/``"Infinity"``/``"-Infinity"``, safe to share between threads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from gradwatch.wire import MAX_COUNT, MAX_STEP

from .detect import Rule, Severity
from .store.models import RunStatus

__all__ = [
    "INCIDENT_CAUSES",
    "MAX_RECORDED_ROWS",
    "EventList",
    "EventOut",
    "IncidentIn",
    "IncidentList",
    "IncidentOut",
    "IncidentRows",
    "LayerHealthOut",
    "OnsetLayerOut",
    "OnsetOut",
    "RunHealthOut",
]

INCIDENT_CAUSES = ("nonfinite", "skipped", "explosion")
"""Why the agent captures a step (``gradwatch.agent.incident``)."""

_NO_NUL = r"^[^\x00]*$"


class _Out(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings", frozen=True)


MAX_RECORDED_ROWS = 4096
"""Rows an incident's ``recorded`` holds at most (before and after its step together)."""
_Rows = Annotated[list[int | None], Field(max_length=MAX_RECORDED_ROWS)]
_Floats = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False)] | None],
    Field(max_length=MAX_RECORDED_ROWS),
]


class IncidentRows(BaseModel):
    """The flight recorder's rows around the bad step, columnar (one entry per step; ``null``
    where unknown): what the server keeps no series of."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: Annotated[
        list[Annotated[StrictInt, Field(ge=0, le=MAX_STEP)]], Field(max_length=MAX_RECORDED_ROWS)
    ]
    learning_rate: _Floats
    loss_scale: _Floats
    epoch: _Rows
    step_in_epoch: _Rows

    @model_validator(mode="after")
    def _one_per_step(self) -> IncidentRows:
        for name in ("learning_rate", "loss_scale", "epoch", "step_in_epoch"):
            if len(getattr(self, name)) != len(self.step):
                raise ValueError(
                    f"{name}: has {len(getattr(self, name))} values, expected "
                    f"{len(self.step)} (one per step)"
                )
        return self


class IncidentIn(BaseModel):
    """An incident bundle the agent wrote, announced in a ``StepBatch``'s ``incidents``.

    Attributes:
        step: The captured (bad) step.
        cause: ``nonfinite`` (a NaN/±Inf gradient or loss), ``skipped`` (a policy skipped
            it) or ``explosion`` (a critical explosion of the global norm, judged in-graph).
        path: The bundle's directory on ``host`` (absolute).
        bytes: Size of its checkpoint on disk.
        format: The bundle's format, e.g. ``gradwatch-incident/1``.
        learning_rate: The learning rate the step would have applied (finite), or ``null``.
        loss_scale: A ``LossScaleOptimizer``'s loss scale at the step (finite), or ``null``.
        recorded: The recorder's rows up to the step, or ``null``; announced again, the
            step's rows after it (the server adds the steps it does not hold).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: Annotated[StrictInt, Field(ge=0, le=MAX_STEP)]
    cause: Literal["nonfinite", "skipped", "explosion"]
    path: Annotated[StrictStr, Field(min_length=1, max_length=4096, pattern=_NO_NUL)]
    host: Annotated[StrictStr, Field(max_length=255, pattern=_NO_NUL)]
    bytes: Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]
    format: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._/-]{1,64}$")]
    learning_rate: Annotated[float, Field(allow_inf_nan=False)] | None = None
    loss_scale: Annotated[float, Field(allow_inf_nan=False)] | None = None
    recorded: IncidentRows | None = None


class IncidentOut(_Out):
    """A stored incident bundle: where it lies (``host``, ``path``) and how to replay it.

    Attributes:
        replay: The command that replays it on ``host``.
        announced_at: When the server stored the announcement.
        recorded: The recorder's rows around the step (learning rate, loss scale, position):
            up to ``recorder_steps`` before it and as many after it, as they arrive.
        learning_rate_history: Those rows' learning rate as runs of equal values, e.g.
            ``learning rate: 0.01 at steps 0–11, 30 from step 12 (×3000)``; ``null`` if none.
        loss_scale_history: The same for the loss scale.
    """

    step: int
    cause: Literal["nonfinite", "skipped", "explosion"]
    path: str
    host: str
    bytes: int
    format: str
    learning_rate: float | None
    loss_scale: float | None
    announced_at: datetime
    replay: str
    recorded: IncidentRows | None = None
    learning_rate_history: str | None = None
    loss_scale_history: str | None = None


class IncidentList(_Out):
    """Reply of ``GET /api/v1/runs/{run_id}/incidents``: the run's bundles by step."""

    run_id: str
    incidents: list[IncidentOut]


class OnsetLayerOut(_Out):
    """A layer off its baseline when a run-level event started, from ``step`` (its first step
    3σ out or non-finite); ``steps_before_global``: the global norm's departure step minus
    ``step`` (negative: after it), ``null`` when the global norm had not departed."""

    layer: str
    step: int
    steps_before_global: int | None


class OnsetOut(_Out):
    """Onset analysis of a run-level explosion, nonfinite or loss event at its first step.

    Attributes:
        summary: One line, e.g. "first: `model/dense_3` at step 41,012, 3 steps before the
            global norm; loss at its baseline".
        global_step: Step from which the global norm was off its baseline, or ``null``.
        loss_step: The same for the loss (``null``: at its baseline, or no loss sent).
        layers: The first departed layers (at most 10), by step, output side first on a tie;
            ``departed_layers`` counts them all.
        first_nonfinite_forward: Of the layers non-finite at the first step, the first in
            the run's layer order (input side); ``first_nonfinite_backward`` the first from
            the output side (where backpropagation made the step's first NaN/Inf).
    """

    summary: str
    global_step: int | None
    loss_step: int | None
    layers: list[OnsetLayerOut]
    departed_layers: int
    first_nonfinite_forward: str | None
    first_nonfinite_backward: str | None


class EventOut(_Out):
    """One detector event: detections of ``rule`` on one series, merged within the cooldown.

    Attributes:
        layer: The layer, or ``null`` for run-level events (global norm, loss, clip rate).
        severity: The highest severity among the merged detections.
        count: Detections (steps on which the rule fired) merged into this event.
        value: The most extreme value seen: a gradient norm (explosion, vanishing), a count of
            non-finite values (nonfinite), a fraction of clipped steps (clip_rate) or a loss
            (loss).
        baseline: What ``value`` was compared with (the running median estimate, the floor,
            the limit), or ``null``.
        onset: For a run-level explosion, nonfinite or loss event, which layers (and whether
            the global norm and the loss) had left their baselines when it started; ``null``
            for other events and for events stored before the analysis existed.
    """

    id: int
    rule: Rule
    layer: str | None
    severity: Severity
    first_step: int
    last_step: int
    count: int
    value: float
    baseline: float | None
    created_at: datetime
    updated_at: datetime
    onset: OnsetOut | None = None
    incidents: list[IncidentOut] = Field(
        default_factory=list,
        description="Incident bundles of steps within the event (run-level events only).",
    )


class EventList(_Out):
    """A page of a run's events, newest first; pass ``next_cursor`` as ``cursor`` for more."""

    run_id: str
    events: list[EventOut]
    next_cursor: str | None


class LayerHealthOut(_Out):
    """A layer with detections: how many, and its gradient-norm summary."""

    layer: str
    detections: int
    events: int
    worst_severity: Severity
    latest_grad_norm: float | None
    max_grad_norm: float | None
    nonfinite_values: int


class RunHealthOut(_Out):
    """Reply of ``GET /api/v1/runs/{run_id}/health``: a run's gradient health at a glance.

    Attributes:
        verdict: ``critical`` or ``warning`` when an event of that severity reaches the
            run's recent steps, ``no_data`` while the run holds no step (nothing was
            recorded, so nothing can be called healthy), else ``healthy``.
        detections: Detections so far by rule, then severity (every rule and severity listed).
        worst_layers: Layers with the most detections, most first.
        last_event: The newest event (by first step), or ``null``.
        onset: The onset summary of the newest run-level explosion, nonfinite or loss
            event (``OnsetOut.summary`` prefixed with the event), or ``null``.
        incidents: The run's incident bundles (the newest 20, by step).
    """

    run_id: str
    status: RunStatus
    verdict: Severity | Literal["healthy", "no_data"]
    last_step: int | None
    last_ingest_at: datetime | None
    detections: dict[str, dict[str, int]]
    worst_layers: list[LayerHealthOut]
    last_event: EventOut | None
    onset: str | None = None
    incidents: list[IncidentOut] = Field(default_factory=list)
