"""What a study trains (:class:`StudyPlan`) and the parsing of the command's lists.

No TensorFlow here: the command validates its options before anything heavy is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .problem import Problem

__all__ = ["OPTIMIZERS", "REMEDIES", "PlanError", "StudyPlan", "parse_names", "parse_rates"]

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam")
"""The optimizers a study can compare (SGD with momentum 0.9; the others with Keras defaults)."""

REMEDIES = ("none", "by_value", "by_norm", "global_norm", "zclip", "autoclip")
"""The remedies a study can compare: none, the fixed clips, the adaptive clips."""


class PlanError(ValueError):
    """A bad list or rate in the command's options (the message names the option)."""


@dataclass(frozen=True, slots=True)
class StudyPlan:
    """What to train.

    Attributes:
        problem: The model and data.
        optimizers: Optimizer names, in order.
        remedies: Remedy names, in order.
        rates: Per optimizer, its (low, high) learning rate.
        steps: Training steps per cell.
        warmup_steps: Unclipped steps per optimizer at its low rate for the thresholds.
        percentile: Percentile of the warm-up norms (:mod:`.threshold`).
        seed: Seed of every run.
        command: The command line, for the report.
    """

    problem: Problem
    optimizers: tuple[str, ...]
    remedies: tuple[str, ...]
    rates: Mapping[str, tuple[float, float]]
    steps: int
    warmup_steps: int = 10
    percentile: float = 50.0
    seed: int = 0
    command: str = ""

    @property
    def num_runs(self) -> int:
        """Warm-ups and cells."""
        return len(self.optimizers) * (1 + 2 * len(self.remedies))


def parse_names(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """``"sgd,adam"`` → ``("sgd", "adam")``, in the order given, each once.

    Raises:
        PlanError: An empty list or a name not in ``allowed``.
    """
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise PlanError(
            f"{option}: expected a comma-separated list of {', '.join(allowed)}, got {text!r}"
        )
    return names


def _rate(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0.0:
        raise PlanError(f"{option}: {text!r} is not a positive learning rate")
    return value


def parse_rates(
    text: str | None, defaults: Mapping[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """``"sgd=0.01:0.1,adam=1e-3:3e-2"`` over ``defaults``: per optimizer, (low, high).

    Optimizers not named keep their default.

    Raises:
        PlanError: A malformed entry, an unknown optimizer, or low ≥ high.
    """
    rates = dict(defaults)
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, _, pair = entry.partition("=")
        low, _, high = pair.partition(":")
        name = name.strip().lower()
        if name not in OPTIMIZERS or not high:
            raise PlanError(
                f"--rates: expected entries like sgd=0.01:0.1 (optimizer=low:high), "
                f"got {entry.strip()!r}"
            )
        pair_values = (_rate(low, "--rates"), _rate(high, "--rates"))
        if pair_values[0] >= pair_values[1]:
            raise PlanError(f"--rates: {name}'s low rate must be below its high rate")
        rates[name] = pair_values
    return rates
