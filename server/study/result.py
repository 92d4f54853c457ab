"""What a study measured: one :class:`CellResult` per cell, and the :class:`StudyResult`.

Value objects only, with their JSON form. Non-finite floats are written the way the gradwatch
wire format writes them (``"NaN"``, ``"Infinity"``, ``"-Infinity"``), so the file is strict
JSON; :func:`study_from_json` reads them back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.wire import decode_float, encode_float

from .threshold import Thresholds

__all__ = [
    "RATES",
    "CellResult",
    "Curve",
    "StudyResult",
    "is_finite",
    "study_from_json",
    "study_to_json",
    "write_json",
]

RATES = ("low", "high")
"""The two learning rates of every optimizer: one that trains, one that explodes unclipped."""


@dataclass(frozen=True, slots=True)
class Curve:
    """A run's recorded series: ``global_norm[i]`` and ``loss[i]`` at ``steps[i]``.

    The global norm is the one before the remedy (what the gradient was); NaN where the
    agent recorded no value.
    """

    steps: tuple[int, ...] = ()
    global_norm: tuple[float, ...] = ()
    loss: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class CellResult:
    """One cell: one optimizer, one remedy, one learning rate.

    Attributes:
        optimizer: ``sgd``, ``adagrad``, ``rmsprop`` or ``adam``.
        remedy: ``none`` or a clip policy's name.
        rate: ``low`` or ``high``.
        learning_rate: The optimizer's learning rate.
        run_id: The run's id on the server.
        run_name: The run's name.
        policy: The policy's description (``ClipPolicy.describe()``), or None.
        steps: Steps trained (fewer than ``planned_steps`` when training stopped at a
            non-finite loss).
        planned_steps: Steps asked for.
        final_loss: Loss on the held-out data after training (NaN when not finite).
        diverged_at: The step where the run diverged (:mod:`.divergence`), or None.
        clipped_steps: Steps whose gradient the remedy scaled down (server's count).
        skipped_steps: Steps whose update was skipped (server's count).
        seconds_per_step: Wall time of one training step, seconds (10th percentile over
            the steps, :class:`~.train.Trained`).
        relative_time: ``seconds_per_step`` over that of the same optimizer's unclipped
            low-rate cell, or None when that cell is not in the study.
        curve: The recorded global norm and loss per step.
    """

    optimizer: str
    remedy: str
    rate: str
    learning_rate: float
    run_id: str
    run_name: str
    policy: Mapping[str, Any] | None
    steps: int
    planned_steps: int
    final_loss: float
    diverged_at: int | None
    clipped_steps: int
    skipped_steps: int
    seconds_per_step: float
    relative_time: float | None = None
    curve: Curve = field(default_factory=Curve)

    @property
    def diverged(self) -> bool:
        """Whether the run diverged."""
        return self.diverged_at is not None


@dataclass(frozen=True, slots=True)
class StudyResult:
    """A whole study.

    Attributes:
        problem: The problem's name (``rnn``, ``mlp`` or ``module:function``).
        description: One line on the model and the data.
        command: The command line that ran it.
        seed: The random seed of every cell.
        steps: Steps per cell.
        optimizers: The optimizers, in order.
        remedies: The remedies, in order.
        rates: Per optimizer, its (low, high) learning rate.
        thresholds: Per optimizer, the limits its warm-up gave.
        cells: Every cell's result.
        summary: Sentences stating what the measurement shows.
        server: The server the runs went to.
        compare_urls: Per ``optimizer/rate``, the web UI's compare view of its runs.
    """

    problem: str
    description: str
    command: str
    seed: int
    steps: int
    optimizers: tuple[str, ...]
    remedies: tuple[str, ...]
    rates: Mapping[str, tuple[float, float]]
    thresholds: Mapping[str, Thresholds]
    cells: tuple[CellResult, ...]
    summary: tuple[str, ...] = ()
    server: str = ""
    compare_urls: Mapping[str, str] = field(default_factory=dict)

    def cell(self, optimizer: str, remedy: str, rate: str) -> CellResult | None:
        """The cell of that optimizer, remedy and rate, if the study has it."""
        for cell in self.cells:
            if (cell.optimizer, cell.remedy, cell.rate) == (optimizer, remedy, rate):
                return cell
        return None


def _floats(values: Sequence[float]) -> list[float | str]:
    return [encode_float(v) for v in values]


def _cell_to_json(cell: CellResult) -> dict[str, Any]:
    return {
        "optimizer": cell.optimizer,
        "remedy": cell.remedy,
        "rate": cell.rate,
        "learning_rate": cell.learning_rate,
        "run_id": cell.run_id,
        "run_name": cell.run_name,
        "policy": dict(cell.policy) if cell.policy is not None else None,
        "steps": cell.steps,
        "planned_steps": cell.planned_steps,
        "final_loss": encode_float(cell.final_loss),
        "diverged": cell.diverged,
        "diverged_at": cell.diverged_at,
        "clipped_steps": cell.clipped_steps,
        "skipped_steps": cell.skipped_steps,
        "seconds_per_step": encode_float(cell.seconds_per_step),
        "relative_time": None if cell.relative_time is None else encode_float(cell.relative_time),
        "curve": {
            "step": list(cell.curve.steps),
            "global_norm": _floats(cell.curve.global_norm),
            "loss": _floats(cell.curve.loss),
        },
    }


def study_to_json(study: StudyResult) -> dict[str, Any]:
    """The study as a JSON-ready dict (strict JSON: non-finite floats as strings)."""
    return {
        "schema": 1,
        "problem": study.problem,
        "description": study.description,
        "command": study.command,
        "seed": study.seed,
        "steps": study.steps,
        "optimizers": list(study.optimizers),
        "remedies": list(study.remedies),
        "rates": {name: {"low": low, "high": high} for name, (low, high) in study.rates.items()},
        "thresholds": {name: t.as_dict() for name, t in study.thresholds.items()},
        "summary": list(study.summary),
        "server": study.server,
        "compare_urls": dict(study.compare_urls),
        "cells": [_cell_to_json(cell) for cell in study.cells],
    }


def _optional_float(value: Any) -> float | None:
    return None if value is None else decode_float(value)


def _cell_from_json(data: Mapping[str, Any]) -> CellResult:
    curve = data["curve"]
    return CellResult(
        optimizer=data["optimizer"],
        remedy=data["remedy"],
        rate=data["rate"],
        learning_rate=float(data["learning_rate"]),
        run_id=data["run_id"],
        run_name=data["run_name"],
        policy=data["policy"],
        steps=int(data["steps"]),
        planned_steps=int(data["planned_steps"]),
        final_loss=decode_float(data["final_loss"]),
        diverged_at=data["diverged_at"],
        clipped_steps=int(data["clipped_steps"]),
        skipped_steps=int(data["skipped_steps"]),
        seconds_per_step=decode_float(data["seconds_per_step"]),
        relative_time=_optional_float(data["relative_time"]),
        curve=Curve(
            steps=tuple(int(s) for s in curve["step"]),
            global_norm=tuple(decode_float(v) for v in curve["global_norm"]),
            loss=tuple(decode_float(v) for v in curve["loss"]),
        ),
    )


def study_from_json(data: Mapping[str, Any]) -> StudyResult:
    """The inverse of :func:`study_to_json`.

    Raises:
        KeyError, ValueError: ``data`` is not a study's JSON.
    """
    return StudyResult(
        problem=data["problem"],
        description=data["description"],
        command=data["command"],
        seed=int(data["seed"]),
        steps=int(data["steps"]),
        optimizers=tuple(data["optimizers"]),
        remedies=tuple(data["remedies"]),
        rates={k: (float(v["low"]), float(v["high"])) for k, v in data["rates"].items()},
        thresholds={
            name: Thresholds(
                global_norm=float(t["global_norm"]),
                tensor_norm=float(t["tensor_norm"]),
                value=float(t["value"]),
                percentile=float(t["percentile"]),
                warmup_steps=int(t["warmup_steps"]),
            )
            for name, t in data["thresholds"].items()
        },
        cells=tuple(_cell_from_json(cell) for cell in data["cells"]),
        summary=tuple(data["summary"]),
        server=data["server"],
        compare_urls=dict(data["compare_urls"]),
    )


def write_json(study: StudyResult, path: Path) -> Path:
    """Write the study to ``path`` (UTF-8, indented); blocks on the write. Returns ``path``."""
    text = json.dumps(study_to_json(study), indent=1, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def is_finite(value: float | None) -> bool:
    """Whether ``value`` is a finite number (``None`` is not)."""
    return value is not None and math.isfinite(value)
