"""The vocabulary of detection: rules, severities, the batch columns detectors read and the
detections they emit. Pure values: thread-safe, never block."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from ..store.models import RUN_LEVEL

if TYPE_CHECKING:
    from .onset import Onset


class Rule(enum.StrEnum):
    """What a detection is about."""

    EXPLOSION = "explosion"
    NONFINITE = "nonfinite"
    VANISHING = "vanishing"
    CLIP_RATE = "clip_rate"
    LOSS = "loss"
    """A loss spike (run level): the loss against its own baseline, like ``explosion``."""


LOSS_SERIES: Final = "\x00loss"
"""Series name of the loss in detector state; no layer may have it (the wire format forbids
NUL in layer names)."""

RULES: Final = tuple(Rule)
RULE_INDEX: Final = {rule: i for i, rule in enumerate(RULES)}


class Severity(enum.StrEnum):
    """How bad a detection is; ordered: ``CRITICAL > WARNING``."""

    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for a warning, 1 for critical."""
        return _SEVERITY_RANK[self]

    def __lt__(self, other: str) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: str) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: str) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: str) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank >= other.rank


_SEVERITY_RANK: Final = {Severity.WARNING: 0, Severity.CRITICAL: 1}
SEVERITIES: Final = (Severity.WARNING, Severity.CRITICAL)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class StepColumns:
    """One ingested batch of one run, as arrays (``n`` steps, ``L`` layers).

    Attributes:
        steps: ``(n,)`` training steps, strictly increasing.
        layers: ``L`` unique, non-empty layer names.
        global_norm: ``(n,)`` global gradient L2 norm before clipping (NaN/±Inf possible).
        grad_norm: ``(n, L)`` per-layer gradient L2 norms (NaN/±Inf possible).
        nonfinite: ``(n, L)`` count of non-finite gradient values per layer.
        clip_coef: ``(n,)`` clip coefficient; < 1 means the step was clipped (NaN possible).
        skipped: ``(n,)`` the update was skipped (e.g. a mixed-precision loss-scale
            overflow: NaN norms, zero counts; never an explosion or a non-finite event).
        loss: ``(n,)`` the loss, NaN where the step reported none; None when the batch
            carries no loss at all.

    Raises:
        ValueError: Shapes disagree, steps are not strictly increasing, or a layer name is
            empty or repeated.
    """

    steps: NDArray[np.int64]
    layers: tuple[str, ...]
    global_norm: NDArray[np.floating[Any]]
    grad_norm: NDArray[np.floating[Any]]
    nonfinite: NDArray[np.int64]
    clip_coef: NDArray[np.floating[Any]]
    skipped: NDArray[np.bool_]
    loss: NDArray[np.floating[Any]] | None = None

    def __post_init__(self) -> None:
        n, width = len(self.steps), len(self.layers)
        if np.shape(self.steps) != (n,):
            raise ValueError("steps: expected a 1-D array")
        if self.loss is not None and np.shape(self.loss) != (n,):
            raise ValueError(f"loss: expected shape ({n},)")
        for name in ("global_norm", "clip_coef", "skipped"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"{name}: expected shape ({n},)")
        for name in ("grad_norm", "nonfinite"):
            if np.shape(getattr(self, name)) != (n, width):
                raise ValueError(f"{name}: expected shape ({n}, {width})")
        if n > 1 and not bool((np.diff(self.steps) > 0).all()):
            raise ValueError("steps: must be strictly increasing")
        if RUN_LEVEL in self.layers:
            raise ValueError("layers: the empty name is the run-level series")
        if LOSS_SERIES in self.layers:
            raise ValueError("layers: the name of the loss series is reserved")
        if len(set(self.layers)) != width:
            raise ValueError("layers: names must be unique")


@dataclass(frozen=True, slots=True)
class Detection:
    """One event: consecutive triggers of one (rule, series) merged within the cooldown.

    Attributes:
        rule: The rule that fired.
        layer: The layer, or ``""`` for the run level (global norm, clip rate).
        severity: The highest severity among the merged triggers.
        first_step: Step of the first merged trigger (in this batch when ``continues``).
        last_step: Step of the last merged trigger.
        count: Triggering steps merged into it.
        value: The most extreme value (explosion: the peak norm; nonfinite: the largest count
            of non-finite values in one step, the sum over layers at run level; vanishing:
            the smallest norm; clip_rate: the largest clipped fraction). Finite or ±Inf,
            never NaN.
        baseline: What ``value`` was compared with at that step (explosion: the baseline
            median, or the ceiling for a ceiling-only trigger, None for an overflow before
            any baseline sample or on a late step; vanishing: the floor; clip_rate:
            ``max_fraction``; nonfinite: None).
        continues: The event extends the one still open from an earlier batch (the previous
            trigger of this (rule, layer) is within the cooldown of ``first_step``): update
            that stored event (:meth:`merged`) instead of inserting a new one. Only triggers
            on new steps continue; a late step's trigger starts its own event.
        after_step: With ``continues``: the step of that previous trigger, which is the
            ``last_step`` of the stored event to extend (None otherwise).
        onset: For a new run-level explosion, non-finite or loss event, which series had
            left their baselines at its first step, and when (:mod:`.onset`); None for
            other events, for continuations (the stored event keeps its own) and for events
            of late steps (their departures are not known).
    """

    rule: Rule
    layer: str
    severity: Severity
    first_step: int
    last_step: int
    count: int
    value: float
    baseline: float | None
    continues: bool
    onset: Onset | None = None
    after_step: int | None = None

    def merged(self, later: Detection) -> Detection:
        """Return this (stored) event extended by ``later``, its continuation from a later batch.

        Severity is the higher one, steps span both, counts add, and ``value``/``baseline``
        come from the more extreme value (the earlier one on a tie), exactly what one batch
        holding both parts would have given. The result keeps this event's ``continues``,
        ``after_step`` and ``onset`` (the onset is fixed when the event starts).

        Raises:
            ValueError: ``later`` is for another rule or layer.
        """
        if (later.rule, later.layer) != (self.rule, self.layer):
            raise ValueError("can only merge detections of the same rule and layer")
        low = self.rule is Rule.VANISHING
        better = later.value < self.value if low else later.value > self.value
        peak = later if better else self
        return Detection(
            rule=self.rule,
            layer=self.layer,
            severity=max(self.severity, later.severity),
            first_step=min(self.first_step, later.first_step),
            last_step=max(self.last_step, later.last_step),
            count=self.count + later.count,
            value=peak.value,
            baseline=peak.baseline,
            continues=self.continues,
            onset=self.onset,
            after_step=self.after_step,
        )
