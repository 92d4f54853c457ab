"""Gradient-health detectors: pure functions from (state, batch, config) to (state, events).

Everything here is pure NumPy and pydantic: no I/O, no clock, no globals that change, so every
function is thread-safe and never blocks. :func:`detect` takes the previous
:class:`DetectorState` of one run (or None), one ingested batch as :class:`StepColumns` and
the project's :class:`DetectorConfig`, and returns a new state (the old one is not modified),
the :class:`Detection` events of the batch and trigger counts for the exporter. Splitting one
stream of steps into batches of any sizes gives the same final state, bit for bit, and the
same events once a continuing event (``continues=True``) is merged into the one it continues
with :meth:`Detection.merged`. Work is vectorised over the series (the global norm and every
layer); only the explosion baseline, a recursive filter, loops over the steps of a batch.

Series: ``""`` is the run level (the global norm and the clip rate), any other name a layer.
Norms are judged in log space, where a gradient norm is close to normal (norms are positive
and change multiplicatively) and "10× the median" is a fixed distance whatever the scale.

Explosion (per series; one baseline *sample* is a finite, positive norm of a step that is
neither skipped nor older than the state's ``last_step``):

* Level ``mu``: an exponentially weighted mean of ``log(norm)`` (span ``level_steps``);
  scale ``var``: an exponentially weighted mean of squared deviations from it (span
  ``window_steps``), ``sigma = max(sqrt(var), sigma_floor)``. The first samples are averaged
  with weight ``1/(n+1)`` (exact mean and variance) until that is smaller than the EMA weight.
* Baseline median ``exp(b)``: ``b`` follows ``mu`` down at once, but up by at most
  ``log(max_growth)/1000`` per sample: a slew-rate limit, so a norm that grows faster than
  ``max_growth`` per 1000 steps keeps pulling away from its baseline however the scale adapts.
* A sample triggers when ``z = (log(norm) - b) / sigma >= z_threshold`` and
  ``norm / exp(b) >= min_ratio``, both judged against the state *before* the sample, and only
  after ``warmup_steps`` samples. ``norm / exp(b) >= critical_ratio`` makes it critical.
* Robust update: a sample with ``z > reject_z`` (every trigger included) is rejected: it
  changes nothing, so a spike never raises its own baseline and a run that starts to blow up
  freezes the baseline it is measured against (hard rejection, the 3-sigma rule; during
  warm-up, when the scale is still unknown, such samples are winsorised instead, Huber's
  M-estimator, so the scale can grow to its true value). Downward deviations are winsorised
  at ``reject_z`` sigma, so the baseline follows falling norms. After ``relearn_steps``
  consecutive rejected samples the level is re-learnt from the current sample and ``b`` is
  allowed the growth it was denied meanwhile, so a permanent change of level ends its event
  instead of alarming forever, while a sustained exponential rise is still caught.
* ``ceiling`` (optional, absolute) applies to every step, during warm-up and to resent steps
  too, and is critical; so is a norm that overflowed to +Inf on a step that was not skipped
  and counted no non-finite values (the sum of squares overflowed).

Non-finite (critical): a layer whose count of non-finite gradient values is > 0 at a step;
at run level a step where any layer counted some, or the global norm is not finite and the
step was not skipped. A skipped step with NaN norms and zero counts (a mixed-precision
loss-scale overflow) raises nothing. NaN, Inf and zero norms never enter any baseline.

Vanishing (warning, per series): a finite norm below ``floor`` on ``consecutive_steps``
consecutive samples; every further such sample triggers too. A finite norm at or above the
floor resets the streak; a skipped step, a non-finite norm or a resent step leaves it as it is.

High clip rate (warning, run level): the fraction of clipped steps (``clip_coef < 1``; NaN is
not clipped) among the last ``window_steps`` new steps is above ``max_fraction``, judged only
once the window is full. The window is kept exactly, one bit per step.

Cooldown: triggers of one (rule, series) merge into one :class:`Detection` while each is
within ``cooldown_steps`` of the previous one (in processing order, so also for late steps),
across batches too (``continues``). Steps at or below the state's ``last_step`` (resent or
late) skip the stateful rules (explosion baseline, vanishing streak, clip window); non-finite,
the ceiling and overflow still apply to them. New series start fresh; series missing from a
batch keep their state.

Measured with the defaults (``bench/detect.py``, ``tests/server/test_detect.py``): no false
alarm on constant norms (σ = 0, or 1e-6 relative jitter); 0.015 events per 10,000 steps of a
series over 3.4M series-steps of healthy runs (lognormal σ_log 0.3-1.0, drifts of ×10 up and
×100 down, AR(1) noise, 16 layers); blow-ups from a σ_log 0.2 steady state caught 111-156 steps
after the onset at ×1.01 per step and 19-26 steps at ×1.05 (float32 overflows after 8917 and
1818); about 2 ms per batch of 50 steps × 500 layers.

Provenance: robust z-scores and the median/MAD-style baseline (Rousseeuw & Croux 1993);
Huber's M-estimator (Huber 1964) for winsorised updates; EWMA control charts (Roberts 1959)
for the recursive mean and variance; ZClip (Kumar et al. 2025) and OLMo-core's spike skipping
for z-scores of gradient norms against a baseline that excludes the current step.
"""

from __future__ import annotations

import enum
import fnmatch
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Final

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    model_validator,
)

__all__ = [
    "ClipRateThresholds",
    "DetectResult",
    "Detection",
    "DetectorConfig",
    "DetectorState",
    "ExplosionOverride",
    "ExplosionThresholds",
    "LayerOverride",
    "NonFiniteOverride",
    "NonFiniteThresholds",
    "Rule",
    "Severity",
    "StateFormatError",
    "StepColumns",
    "Thresholds",
    "VanishingOverride",
    "VanishingThresholds",
    "detect",
]

RUN_LEVEL: Final = ""
"""Series name of the run-level series (global norm, clip rate)."""

_MAX_STEPS = 1_000_000_000
_MAX_CLIP_WINDOW = 1_000_000
_NO_STEP: Final = np.iinfo(np.int64).min
"""``last_trigger`` of a (rule, series) that never triggered."""


class Rule(enum.StrEnum):
    """What a detection is about."""

    EXPLOSION = "explosion"
    NONFINITE = "nonfinite"
    VANISHING = "vanishing"
    CLIP_RATE = "clip_rate"


_RULES: Final = tuple(Rule)
_RULE_INDEX: Final = {rule: i for i, rule in enumerate(_RULES)}


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
_SEVERITIES: Final = (Severity.WARNING, Severity.CRITICAL)


class StateFormatError(ValueError):
    """Stored detector state that this version cannot read (unknown version, truncated)."""


# --------------------------------------------------------------------------- configuration

_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Ratio = Annotated[float, Field(ge=1, allow_inf_nan=False)]
_Growth = Annotated[float, Field(gt=1, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
_Steps = Annotated[int, Field(ge=1, le=_MAX_STEPS)]
_Cooldown = Annotated[int, Field(ge=0, le=_MAX_STEPS)]
_ClipWindow = Annotated[int, Field(ge=1, le=_MAX_CLIP_WINDOW)]

_EXPLOSION_DOCS: Final = {
    "enabled": "Run the explosion rule on this series.",
    "z_threshold": (
        "Robust z-score, in standard deviations of log(norm), at or above which a step is an "
        "explosion (together with min_ratio). 6: a false alarm on a normal log-norm is ~1e-9 "
        "per step, and the scale is estimated, so the tails are a little heavier than that."
    ),
    "min_ratio": (
        "Smallest norm / baseline median (a factor, ≥ 1) that can be an explosion. 3: a "
        "constant or barely moving norm never alarms on jitter (σ = 0), and a one-step "
        "doubling of a quiet layer is not an explosion."
    ),
    "critical_ratio": (
        "Norm / baseline median (a factor, ≥ min_ratio) from which an explosion is critical. "
        "30: ~3.4 in log units, beyond any healthy fluctuation; one step this large can wreck "
        "Adam's moment estimates."
    ),
    "ceiling": (
        "Absolute gradient-norm limit (norm units); above it a step is a critical explosion, "
        "during warm-up and on resent steps too. None (default): no absolute limit, since "
        "healthy scales differ by orders of magnitude between models."
    ),
    "warmup_steps": (
        "Baseline samples (finite, positive norms of new, not skipped steps) before the "
        "z-score and ratio tests start. 200: a usable scale even for slowly wandering norms "
        "(half the early false alarms of 100 on strongly autocorrelated ones); the ceiling "
        "covers the warm-up."
    ),
    "window_steps": (
        "EMA span, in baseline samples, of the scale (variance of log(norm)). 1000: long "
        "enough that slowly wandering (autocorrelated) norms are measured at their full "
        "spread, so their excursions are not mistaken for explosions."
    ),
    "level_steps": (
        "EMA span, in baseline samples, of the level (mean of log(norm)). 300: follows healthy "
        "drifts closely, so the trend lag barely inflates the scale and a slow blow-up stands "
        "out sooner."
    ),
    "reject_z": (
        "z-score (standard deviations) above which a sample never updates the baseline "
        "(hard rejection; winsorised during warm-up); downward deviations are winsorised at "
        "this many standard deviations. 3: the three-sigma rule; at most z_threshold."
    ),
    "sigma_floor": (
        "Smallest standard deviation of log(norm) used in z-scores (log units: 0.1 ≈ 10 %). "
        "Keeps σ = 0 (constant norms) finite and makes tiny relative jitter harmless."
    ),
    "max_growth": (
        "Largest growth the baseline median follows, as a factor per 1000 baseline samples "
        "(> 1). 4: follows healthy drifts (×10 over 2000 steps included); a norm that keeps "
        "growing faster (an exponential blow-up) pulls away from its baseline until it "
        "triggers, long before float32 overflows."
    ),
    "relearn_steps": (
        "Consecutive rejected samples after which the level is re-learnt from the current "
        "sample (the baseline median still rises at most max_growth per 1000 samples), so a "
        "permanent change of level ends its event. 500."
    ),
}
_VANISHING_DOCS: Final = {
    "enabled": "Run the vanishing rule on this series.",
    "floor": (
        "Gradient norm (norm units) below which a step counts as vanishing. 1e-7: Keras' "
        "Adam epsilon; when every gradient value of a layer is below it, the update shrinks "
        "in proportion to the gradient and the layer effectively stops learning."
    ),
    "consecutive_steps": (
        "Consecutive baseline samples below the floor before a detection. 100: a layer that "
        "gets no gradient for 100 steps is dead, not having one quiet batch."
    ),
}
_CLIP_DOCS: Final = {
    "enabled": "Run the clip-rate rule (run level only).",
    "window_steps": (
        "Steps in the sliding window (kept exactly, one bit per step). 200: a rate over a few "
        "hundred steps, judged only once the window is full."
    ),
    "max_fraction": (
        "Fraction of clipped steps in the window (0 < f ≤ 1) above which the rate is too "
        "high. 0.5: when most steps are clipped, clipping no longer guards against rare "
        "spikes but silently rescales the learning rate."
    ),
}
_NONFINITE_DOCS: Final = {"enabled": "Run the non-finite rule on this series."}
_COOLDOWN_DOC: Final = (
    "Triggers of the same (rule, series) within this many steps of the previous trigger merge "
    "into one event. 100: one event per incident, not one per step."
)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ExplosionThresholds(_Frozen):
    """Explosion rule: robust z-score and ratio against a log-space baseline, plus a ceiling."""

    enabled: StrictBool = Field(default=True, description=_EXPLOSION_DOCS["enabled"])
    z_threshold: _Positive = Field(default=6.0, description=_EXPLOSION_DOCS["z_threshold"])
    min_ratio: _Ratio = Field(default=3.0, description=_EXPLOSION_DOCS["min_ratio"])
    critical_ratio: _Ratio = Field(default=30.0, description=_EXPLOSION_DOCS["critical_ratio"])
    ceiling: _Positive | None = Field(default=None, description=_EXPLOSION_DOCS["ceiling"])
    warmup_steps: _Steps = Field(default=200, description=_EXPLOSION_DOCS["warmup_steps"])
    window_steps: _Steps = Field(default=1000, description=_EXPLOSION_DOCS["window_steps"])
    level_steps: _Steps = Field(default=300, description=_EXPLOSION_DOCS["level_steps"])
    reject_z: _Positive = Field(default=3.0, description=_EXPLOSION_DOCS["reject_z"])
    sigma_floor: _Positive = Field(default=0.1, description=_EXPLOSION_DOCS["sigma_floor"])
    max_growth: _Growth = Field(default=4.0, description=_EXPLOSION_DOCS["max_growth"])
    relearn_steps: _Steps = Field(default=500, description=_EXPLOSION_DOCS["relearn_steps"])

    @model_validator(mode="after")
    def _check_order(self) -> ExplosionThresholds:
        if self.critical_ratio < self.min_ratio:
            raise ValueError(
                f"critical_ratio ({self.critical_ratio}) must be ≥ min_ratio ({self.min_ratio})"
            )
        if self.reject_z > self.z_threshold:
            raise ValueError(
                f"reject_z ({self.reject_z}) must be ≤ z_threshold ({self.z_threshold})"
            )
        return self


class VanishingThresholds(_Frozen):
    """Vanishing rule: norm below an absolute floor for N consecutive samples."""

    enabled: StrictBool = Field(default=True, description=_VANISHING_DOCS["enabled"])
    floor: _Positive = Field(default=1e-7, description=_VANISHING_DOCS["floor"])
    consecutive_steps: _Steps = Field(default=100, description=_VANISHING_DOCS["consecutive_steps"])


class ClipRateThresholds(_Frozen):
    """High clip rate (run level only): clipped fraction over a sliding window of steps."""

    enabled: StrictBool = Field(default=True, description=_CLIP_DOCS["enabled"])
    window_steps: _ClipWindow = Field(default=200, description=_CLIP_DOCS["window_steps"])
    max_fraction: _Fraction = Field(default=0.5, description=_CLIP_DOCS["max_fraction"])


class NonFiniteThresholds(_Frozen):
    """Non-finite rule: any NaN/Inf gradient value (critical)."""

    enabled: StrictBool = Field(default=True, description=_NONFINITE_DOCS["enabled"])


class Thresholds(_Frozen):
    """The full set of thresholds for one series."""

    explosion: ExplosionThresholds = ExplosionThresholds()
    vanishing: VanishingThresholds = VanishingThresholds()
    clip_rate: ClipRateThresholds = ClipRateThresholds()
    nonfinite: NonFiniteThresholds = NonFiniteThresholds()
    cooldown_steps: _Cooldown = Field(default=100, description=_COOLDOWN_DOC)


class ExplosionOverride(_Frozen):
    """Partial :class:`ExplosionThresholds`: a None field keeps the project default."""

    enabled: StrictBool | None = Field(default=None, description=_EXPLOSION_DOCS["enabled"])
    z_threshold: _Positive | None = Field(default=None, description=_EXPLOSION_DOCS["z_threshold"])
    min_ratio: _Ratio | None = Field(default=None, description=_EXPLOSION_DOCS["min_ratio"])
    critical_ratio: _Ratio | None = Field(
        default=None, description=_EXPLOSION_DOCS["critical_ratio"]
    )
    ceiling: _Positive | None = Field(
        default=None,
        description=_EXPLOSION_DOCS["ceiling"]
        + " In an override, None keeps the project's ceiling.",
    )
    warmup_steps: _Steps | None = Field(default=None, description=_EXPLOSION_DOCS["warmup_steps"])
    window_steps: _Steps | None = Field(default=None, description=_EXPLOSION_DOCS["window_steps"])
    level_steps: _Steps | None = Field(default=None, description=_EXPLOSION_DOCS["level_steps"])
    reject_z: _Positive | None = Field(default=None, description=_EXPLOSION_DOCS["reject_z"])
    sigma_floor: _Positive | None = Field(default=None, description=_EXPLOSION_DOCS["sigma_floor"])
    max_growth: _Growth | None = Field(default=None, description=_EXPLOSION_DOCS["max_growth"])
    relearn_steps: _Steps | None = Field(default=None, description=_EXPLOSION_DOCS["relearn_steps"])


class VanishingOverride(_Frozen):
    """Partial :class:`VanishingThresholds`: a None field keeps the project default."""

    enabled: StrictBool | None = Field(default=None, description=_VANISHING_DOCS["enabled"])
    floor: _Positive | None = Field(default=None, description=_VANISHING_DOCS["floor"])
    consecutive_steps: _Steps | None = Field(
        default=None, description=_VANISHING_DOCS["consecutive_steps"]
    )


class NonFiniteOverride(_Frozen):
    """Partial :class:`NonFiniteThresholds`: a None field keeps the project default."""

    enabled: StrictBool | None = Field(default=None, description=_NONFINITE_DOCS["enabled"])


class LayerOverride(_Frozen):
    """Thresholds for the layers whose name matches ``pattern``; unset fields fall back to the
    project defaults. There is no ``clip_rate`` section: the clip rate is run level only."""

    pattern: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "fnmatch-style glob on the layer name, case-sensitive: * matches any characters, "
            "'/' included (e.g. 'encoder/*'), ? one character, [seq] one of seq."
        ),
    )
    explosion: ExplosionOverride | None = None
    vanishing: VanishingOverride | None = None
    nonfinite: NonFiniteOverride | None = None
    cooldown_steps: _Cooldown | None = Field(default=None, description=_COOLDOWN_DOC)

    def apply(self, defaults: Thresholds) -> Thresholds:
        """Return ``defaults`` with this override's set fields replaced, validated.

        Raises:
            pydantic.ValidationError: The combination is invalid (e.g. an overridden
                ``min_ratio`` above the default ``critical_ratio``).
        """
        merged: dict[str, Any] = defaults.model_dump()
        for section in ("explosion", "vanishing", "nonfinite"):
            override: BaseModel | None = getattr(self, section)
            if override is not None:
                merged[section].update(override.model_dump(exclude_none=True))
        if self.cooldown_steps is not None:
            merged["cooldown_steps"] = self.cooldown_steps
        return Thresholds.model_validate(merged)


class DetectorConfig(_Frozen):
    """All detector settings of one project; JSON-serialisable (``model_dump(mode="json")``).

    Validated at construction, overrides included (each is applied to the defaults once).
    """

    thresholds: Thresholds = Thresholds()
    layers: tuple[LayerOverride, ...] = Field(
        default=(),
        max_length=1000,
        description="Per-layer overrides; the first matching pattern wins.",
    )

    _resolved: tuple[Thresholds, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _check_overrides(self) -> DetectorConfig:
        resolved = []
        for index, override in enumerate(self.layers):
            _pattern(override.pattern)
            try:
                resolved.append(override.apply(self.thresholds))
            except ValidationError as error:
                details = "; ".join(
                    f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                    for item in error.errors()
                )
                raise ValueError(
                    f"layers[{index}] (pattern {override.pattern!r}) "
                    f"gives invalid thresholds: {details}"
                ) from None
        self._resolved = tuple(resolved)
        return self

    def resolve(self, layer: str) -> Thresholds:
        """Return the thresholds of one series: the first override whose pattern matches
        ``layer``, else the project defaults. ``""`` (run level) always gets the defaults."""
        index = self._match(layer)
        return self.thresholds if index < 0 else self._resolved[index]

    def _match(self, layer: str) -> int:
        """Index of the first override matching ``layer``; -1 for none (or run level)."""
        if layer == RUN_LEVEL:
            return -1
        for index, override in enumerate(self.layers):
            if _pattern(override.pattern).match(layer):
                return index
        return -1


@lru_cache(maxsize=1024)
def _pattern(glob: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(glob), re.DOTALL)


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

    def __post_init__(self) -> None:
        n, width = len(self.steps), len(self.layers)
        if np.shape(self.steps) != (n,):
            raise ValueError("steps: expected a 1-D array")
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
            any baseline sample; vanishing: the floor; clip_rate: ``max_fraction``;
            nonfinite: None).
        continues: The event extends the one still open from an earlier batch (the previous
            trigger of this (rule, layer) is within the cooldown of ``first_step``): update
            that stored event (:meth:`merged`) instead of inserting a new one.
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

    def merged(self, later: Detection) -> Detection:
        """Return this (stored) event extended by ``later``, its continuation from a later batch.

        Severity is the higher one, steps span both, counts add, and ``value``/``baseline``
        come from the more extreme value (the earlier one on a tie), exactly what one batch
        holding both parts would have given. The result keeps this event's ``continues``.

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
        )


# --------------------------------------------------------------------------- state

_MAGIC: Final = b"GWDS"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("<4sB")
_BODY: Final = struct.Struct("<?qII")
_FLOAT: Final = np.dtype("<f8")
_INT: Final = np.dtype("<i8")
_COUNT: Final = np.dtype("<u4")


class DetectorState:
    """All per-series detector state of one run, keyed by series (layer name, ``""`` = run
    level). Immutable by convention: :func:`detect` returns a new state and never modifies the
    one it is given, so a state may be shared between threads.

    Per series: the explosion baseline (samples ``n``, level ``mu``, scale ``var``, baseline
    ``b`` in log units, consecutive rejected samples), the vanishing streak and the step of the
    last trigger of each rule; per run: the clip-rate window bits and ``last_step``. About 80
    bytes per series plus its name before compression; :meth:`to_bytes` is compact, versioned
    and lossless.
    """

    __slots__ = (
        "_base",
        "_clip_bits",
        "_index",
        "_last_step",
        "_last_trigger",
        "_mu",
        "_n",
        "_rejected",
        "_series",
        "_streak",
        "_var",
    )

    def __init__(
        self,
        series: tuple[str, ...] = (),
        *,
        n: NDArray[np.int64] | None = None,
        mu: NDArray[np.float64] | None = None,
        var: NDArray[np.float64] | None = None,
        base: NDArray[np.float64] | None = None,
        rejected: NDArray[np.int64] | None = None,
        streak: NDArray[np.int64] | None = None,
        last_trigger: NDArray[np.int64] | None = None,
        clip_bits: NDArray[np.bool_] | None = None,
        last_step: int | None = None,
    ) -> None:
        """Build a state; arrays default to the fresh state of every series.

        Args:
            series: Series names (unique; ``""`` is the run level).
            n, mu, var, base, rejected, streak: ``(S,)`` per-series values.
            last_trigger: ``(S, 4)`` step of the last trigger per rule (``Rule`` order).
            clip_bits: The clip window, oldest first (True = clipped).
            last_step: Last step processed by the stateful rules.
        """
        size = len(series)
        self._series = series
        self._index = {name: i for i, name in enumerate(series)}
        if len(self._index) != size:
            raise ValueError("series names must be unique")
        self._n = np.zeros(size, np.int64) if n is None else n
        self._mu = np.zeros(size, np.float64) if mu is None else mu
        self._var = np.zeros(size, np.float64) if var is None else var
        self._base = np.zeros(size, np.float64) if base is None else base
        self._rejected = np.zeros(size, np.int64) if rejected is None else rejected
        self._streak = np.zeros(size, np.int64) if streak is None else streak
        self._last_trigger = (
            np.full((size, len(_RULES)), _NO_STEP, np.int64)
            if last_trigger is None
            else last_trigger
        )
        self._clip_bits = np.zeros(0, np.bool_) if clip_bits is None else clip_bits
        self._last_step = last_step
        for name in ("_n", "_mu", "_var", "_base", "_rejected", "_streak"):
            if getattr(self, name).shape != (size,):
                raise ValueError(f"{name[1:]}: expected shape ({size},)")
        if self._last_trigger.shape != (size, len(_RULES)):
            raise ValueError(f"last_trigger: expected shape ({size}, {len(_RULES)})")

    @property
    def series(self) -> tuple[str, ...]:
        """Names of the series with state, in the order they first appeared."""
        return self._series

    @property
    def last_step(self) -> int | None:
        """Last step processed by the stateful rules; None before any step."""
        return self._last_step

    def baseline(self, layer: str) -> float | None:
        """The explosion baseline median (norm units) of a series; None before any sample."""
        index = self._index.get(layer)
        if index is None or self._n[index] == 0:
            return None
        return math.exp(float(self._base[index]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DetectorState):
            return NotImplemented
        return (
            self._series == other._series
            and self._last_step == other._last_step
            and all(
                np.array_equal(getattr(self, name), getattr(other, name))
                for name in (
                    "_n",
                    "_mu",
                    "_var",
                    "_base",
                    "_rejected",
                    "_streak",
                    "_last_trigger",
                    "_clip_bits",
                )
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"DetectorState(series={len(self._series)}, last_step={self._last_step}, "
            f"clip_bits={len(self._clip_bits)})"
        )

    def to_bytes(self) -> bytes:
        """Serialise losslessly: a 5-byte header (magic ``GWDS``, version 1), then a zlib
        stream of little-endian fields and arrays. Pure; about 25-40 bytes per series
        (12.7 kB for 500 layers)."""
        names = [name.encode("utf-8") for name in self._series]
        parts = [
            _BODY.pack(
                self._last_step is not None,
                0 if self._last_step is None else self._last_step,
                len(names),
                len(self._clip_bits),
            ),
            np.asarray([len(name) for name in names], _COUNT).tobytes(),
            b"".join(names),
            self._n.astype(_INT).tobytes(),
            self._mu.astype(_FLOAT).tobytes(),
            self._var.astype(_FLOAT).tobytes(),
            self._base.astype(_FLOAT).tobytes(),
            self._rejected.astype(_INT).tobytes(),
            self._streak.astype(_INT).tobytes(),
            self._last_trigger.astype(_INT).tobytes(),
            np.packbits(self._clip_bits).tobytes(),
        ]
        return _HEADER.pack(_MAGIC, _VERSION) + zlib.compress(b"".join(parts), 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> DetectorState:
        """Read what :meth:`to_bytes` wrote.

        Raises:
            StateFormatError: Not a detector state, an unknown version, or truncated.
        """
        if len(data) < _HEADER.size:
            raise StateFormatError("detector state: too short")
        magic, version = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise StateFormatError("detector state: bad magic (not a gradwatch detector state)")
        if version != _VERSION:
            raise StateFormatError(
                f"detector state: unsupported version {version} (this server reads {_VERSION})"
            )
        try:
            body = zlib.decompress(data[_HEADER.size :])
        except zlib.error as error:
            raise StateFormatError(f"detector state: corrupt ({error})") from None
        reader = _Reader(body)
        has_last, last_step, size, clip_len = reader.unpack(_BODY)
        lengths = reader.array(_COUNT, size)
        blob = reader.take(int(lengths.sum()))
        ends = np.cumsum(lengths)
        try:
            series = tuple(
                blob[end - length : end].decode("utf-8")
                for end, length in zip(ends.tolist(), lengths.tolist(), strict=True)
            )
        except UnicodeDecodeError as error:
            raise StateFormatError(f"detector state: bad series name ({error})") from None
        n = reader.array(_INT, size)
        mu = reader.array(_FLOAT, size)
        var = reader.array(_FLOAT, size)
        base = reader.array(_FLOAT, size)
        rejected = reader.array(_INT, size)
        streak = reader.array(_INT, size)
        last_trigger = reader.array(_INT, size * len(_RULES)).reshape(size, len(_RULES))
        packed = reader.array(np.dtype(np.uint8), (clip_len + 7) // 8)
        reader.finish()
        try:
            return cls(
                series,
                n=n,
                mu=mu,
                var=var,
                base=base,
                rejected=rejected,
                streak=streak,
                last_trigger=last_trigger,
                clip_bits=np.unpackbits(packed, count=clip_len).astype(np.bool_),
                last_step=int(last_step) if has_last else None,
            )
        except ValueError as error:
            raise StateFormatError(f"detector state: {error}") from None


class _Reader:
    """Sequential reads from a bytes body, raising :class:`StateFormatError` on truncation."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._offset = 0

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._body):
            raise StateFormatError("detector state: truncated")
        chunk = self._body[self._offset : end]
        self._offset = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def array(self, dtype: np.dtype[Any], count: int) -> NDArray[Any]:
        raw = self.take(dtype.itemsize * count)
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)

    def finish(self) -> None:
        if self._offset != len(self._body):
            raise StateFormatError("detector state: trailing bytes")


@dataclass(frozen=True, slots=True)
class DetectResult:
    """What :func:`detect` returns.

    Attributes:
        state: The state after the batch (a new object).
        events: Events of the batch, by first step, then rule, then series (run level first,
            then the batch's layer order).
        triggers: Triggering (step, series) pairs per (rule, severity) in this batch; only
            non-zero entries. A sustained explosion keeps adding to these while its events
            merge (``gradwatch_detector_events_total`` counts them).
    """

    state: DetectorState
    events: list[Detection]
    triggers: dict[tuple[Rule, Severity], int]


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True, slots=True)
class _Params:
    """Thresholds of the batch's series (run level first) as ``(S,)`` arrays."""

    explosion: NDArray[np.bool_]
    z_threshold: NDArray[np.float64]
    log_min_ratio: NDArray[np.float64]
    log_critical_ratio: NDArray[np.float64]
    ceiling: NDArray[np.float64]
    warmup: NDArray[np.int64]
    alpha_var: NDArray[np.float64]
    alpha_mu: NDArray[np.float64]
    reject_z: NDArray[np.float64]
    sigma_floor: NDArray[np.float64]
    growth: NDArray[np.float64]
    relearn: NDArray[np.int64]
    vanishing: NDArray[np.bool_]
    floor: NDArray[np.float64]
    consecutive: NDArray[np.int64]
    nonfinite: NDArray[np.bool_]
    cooldown: NDArray[np.int64]
    clip: ClipRateThresholds


def _params(config: DetectorConfig, layers: Sequence[str]) -> _Params:
    """Resolve the thresholds of ``""`` + ``layers`` once per distinct override."""
    if config.layers:
        matches = np.asarray([-1] + [config._match(layer) for layer in layers], np.int64)
    else:
        matches = np.full(len(layers) + 1, -1, np.int64)
    distinct, which = np.unique(matches, return_inverse=True)
    table = [config.thresholds if i < 0 else config._resolved[int(i)] for i in distinct]

    def column(read: Any, dtype: Any) -> NDArray[Any]:
        return np.asarray([read(t) for t in table], dtype)[which]

    return _Params(
        explosion=column(lambda t: t.explosion.enabled, np.bool_),
        z_threshold=column(lambda t: t.explosion.z_threshold, np.float64),
        log_min_ratio=column(lambda t: math.log(t.explosion.min_ratio), np.float64),
        log_critical_ratio=column(lambda t: math.log(t.explosion.critical_ratio), np.float64),
        ceiling=column(
            lambda t: math.inf if t.explosion.ceiling is None else t.explosion.ceiling,
            np.float64,
        ),
        warmup=column(lambda t: t.explosion.warmup_steps, np.int64),
        alpha_var=column(lambda t: 2.0 / (t.explosion.window_steps + 1), np.float64),
        alpha_mu=column(lambda t: 2.0 / (t.explosion.level_steps + 1), np.float64),
        reject_z=column(lambda t: t.explosion.reject_z, np.float64),
        sigma_floor=column(lambda t: t.explosion.sigma_floor, np.float64),
        growth=column(lambda t: math.log(t.explosion.max_growth) / 1000.0, np.float64),
        relearn=column(lambda t: t.explosion.relearn_steps, np.int64),
        vanishing=column(lambda t: t.vanishing.enabled, np.bool_),
        floor=column(lambda t: t.vanishing.floor, np.float64),
        consecutive=column(lambda t: t.vanishing.consecutive_steps, np.int64),
        nonfinite=column(lambda t: t.nonfinite.enabled, np.bool_),
        cooldown=column(lambda t: t.cooldown_steps, np.int64),
        clip=config.thresholds.clip_rate,
    )


@dataclass(slots=True)
class _Triggers:
    """The triggers of one rule in a batch: ``(n, S)`` masks and values."""

    fired: NDArray[np.bool_]
    critical: NDArray[np.bool_]
    value: NDArray[np.float64]
    baseline: NDArray[np.float64]
    """NaN where the detection has no baseline (or where ``log_baseline`` gives it)."""
    log_baseline: NDArray[np.float64] | None = None
    """Natural log of the baseline where not NaN (explosion: exponentiated per event)."""


def detect(state: DetectorState | None, batch: StepColumns, config: DetectorConfig) -> DetectResult:
    """Run every detector over one batch of one run.

    Pure (the given state is not modified), thread-safe and non-blocking; no I/O. Cost: about
    25 NumPy operations per step of the batch on arrays of ``L + 1`` series, plus a few over
    the whole batch; about 2 ms for 50 steps × 500 layers.

    Args:
        state: The run's state after its previous batch, or None for a new run.
        batch: The batch; steps at or below ``state.last_step`` skip the stateful rules.
        config: The project's thresholds.

    Returns:
        The new state, the batch's events and its trigger counts.
    """
    state = DetectorState() if state is None else state
    known = state.series
    fresh = [name for name in (RUN_LEVEL, *batch.layers) if name not in state._index]
    series = known + tuple(fresh)
    index = {name: i for i, name in enumerate(series)}
    grow = len(fresh)
    cols = np.asarray([index[RUN_LEVEL], *(index[name] for name in batch.layers)], np.int64)

    def widen(values: NDArray[Any], fill: Any) -> NDArray[Any]:
        if not grow:
            return values.copy()
        extra = np.full((grow, *values.shape[1:]), fill, values.dtype)
        return np.concatenate([values, extra])

    n_all = widen(state._n, 0)
    mu_all = widen(state._mu, 0.0)
    var_all = widen(state._var, 0.0)
    base_all = widen(state._base, 0.0)
    rejected_all = widen(state._rejected, 0)
    streak_all = widen(state._streak, 0)
    last_trigger_all = widen(state._last_trigger, _NO_STEP)

    params = _params(config, batch.layers)
    steps = np.asarray(batch.steps, np.int64)
    rows = len(steps)
    new = steps > state.last_step if state.last_step is not None else np.ones(rows, np.bool_)
    skipped = np.asarray(batch.skipped, np.bool_)
    norm = np.empty((rows, len(cols)), np.float64)
    norm[:, 0] = batch.global_norm
    norm[:, 1:] = batch.grad_norm
    counts = np.asarray(batch.nonfinite, np.int64)
    counts_total = counts.sum(axis=1)
    series_counts = np.empty_like(norm, dtype=np.int64)
    series_counts[:, 0] = counts_total
    series_counts[:, 1:] = counts

    explosion = _explode(
        norm, series_counts, new, skipped, params,
        n_all, mu_all, var_all, base_all, rejected_all, cols,
    )  # fmt: skip
    vanishing = _vanish(norm, new, skipped, params, streak_all, cols)
    nonfinite = _nonfinite(norm, counts, counts_total, skipped, params)
    clip_bits, clip = _clip_rate(batch.clip_coef, new, params.clip, state._clip_bits, len(cols))

    triggers: dict[tuple[Rule, Severity], int] = {}
    events: list[tuple[int, int, int, Detection]] = []
    names = (RUN_LEVEL, *batch.layers)
    for rule, found in (
        (Rule.EXPLOSION, explosion),
        (Rule.NONFINITE, nonfinite),
        (Rule.VANISHING, vanishing),
        (Rule.CLIP_RATE, clip),
    ):
        if found is None:
            continue
        critical = int(np.count_nonzero(found.critical & found.fired))
        warning = int(np.count_nonzero(found.fired)) - critical
        for severity, count in zip(_SEVERITIES, (warning, critical), strict=True):
            if count:
                triggers[rule, severity] = count
        rule_index = _RULE_INDEX[rule]
        last = last_trigger_all[cols, rule_index]
        for position, detection in _merge(rule, found, steps, names, last, params.cooldown):
            events.append((detection.first_step, rule_index, position, detection))
        fired_any = found.fired.any(axis=0)
        if fired_any.any():
            last_row = rows - 1 - np.argmax(found.fired[::-1], axis=0)
            updated = np.where(fired_any, steps[last_row], last)
            last_trigger_all[cols, rule_index] = updated

    events.sort(key=lambda item: item[:3])
    last_step = state.last_step
    if new.any():
        top = int(steps[-1])
        last_step = top if last_step is None else max(last_step, top)
    result_state = DetectorState(
        series,
        n=n_all,
        mu=mu_all,
        var=var_all,
        base=base_all,
        rejected=rejected_all,
        streak=streak_all,
        last_trigger=last_trigger_all,
        clip_bits=clip_bits,
        last_step=last_step,
    )
    return DetectResult(state=result_state, events=[item[3] for item in events], triggers=triggers)


def _explode(
    norm: NDArray[np.float64],
    series_counts: NDArray[np.int64],
    new: NDArray[np.bool_],
    skipped: NDArray[np.bool_],
    p: _Params,
    n_all: NDArray[np.int64],
    mu_all: NDArray[np.float64],
    var_all: NDArray[np.float64],
    base_all: NDArray[np.float64],
    rejected_all: NDArray[np.int64],
    cols: NDArray[np.int64],
) -> _Triggers:
    """Explosion triggers; updates the baseline arrays of the batch's series in place.

    One pass per step, vectorised over the series. Entries that are not samples are given
    ``log(1) = 0`` and zero weight, so every update is plain arithmetic that leaves them
    bit-for-bit unchanged. While some series is young (in warm-up, or its weights still
    ``1/(n+1)``), extra ``where`` terms handle first samples, warm-up and winsorising; past
    that they would be identities, so skipping them gives the same bits whatever the batching.
    """
    rows, width = norm.shape
    positive = np.isfinite(norm) & (norm > 0)
    overflow = np.isposinf(norm) & ~skipped[:, None] & (series_counts == 0)
    above = positive & (norm > p.ceiling)
    evaluate = positive & new[:, None] & p.explosion
    learn = positive & new[:, None] & ~skipped[:, None]
    safe = np.where(positive, norm, 1.0)
    statistical = np.zeros((rows, width), np.bool_)
    deviations = np.zeros((rows, width), np.float64)
    log_base = np.empty((rows, width), np.float64)
    samples = np.empty((rows, width), np.int64)

    n = n_all[cols]
    mu = mu_all[cols]
    var = var_all[cols]
    base = base_all[cols]
    rejected = rejected_all[cols]
    horizon = np.maximum(p.warmup + 1, np.ceil(1.0 / np.minimum(p.alpha_mu, p.alpha_var)))
    young = bool((n < horizon).any())
    active: NDArray[np.bool_] = np.any(evaluate | learn, axis=1)
    for i in range(rows):
        log_base[i] = base
        samples[i] = n
        if not active[i]:
            continue
        x = np.log(safe[i])
        sigma = np.sqrt(var)
        np.maximum(sigma, p.sigma_floor, out=sigma)
        deviation = x - base
        z = deviation / sigma
        fire = z >= p.z_threshold
        fire &= deviation >= p.log_min_ratio
        fire &= evaluate[i]
        reject = z > p.reject_z
        if young:
            warm = n >= p.warmup
            fire &= warm
            reject &= warm
        statistical[i] = fire
        deviations[i] = deviation
        reject |= fire
        candidate = learn[i]
        reject &= candidate
        accept = candidate ^ reject
        limit = p.reject_z * sigma
        delta = x - mu
        np.minimum(delta, limit, out=delta)
        np.maximum(delta, -limit, out=delta)
        if young:
            fresh = 1.0 / (n + 1)
            first = accept & (n == 0)
            delta[first] = 0.0
            mu = np.where(first, x, mu)
            weight_mu = accept * np.maximum(p.alpha_mu, fresh)
            weight_var = accept * np.maximum(p.alpha_var, fresh)
        else:
            weight_mu = accept * p.alpha_mu
            weight_var = accept * p.alpha_var
        mu = mu + weight_mu * delta
        var = (1.0 - weight_var) * (var + weight_var * (delta * delta))
        n = n + accept
        capped = np.minimum(mu, base + p.growth)
        if young:
            capped = np.where(n <= p.warmup, mu, capped)
        base = np.where(accept, capped, base)
        rejected = (rejected + reject) * ~accept
        relearn = rejected >= p.relearn
        if relearn.any():
            mu = np.where(relearn, x, mu)
            base = np.where(relearn, np.minimum(x, base + p.relearn * p.growth), base)
            rejected = np.where(relearn, 0, rejected)

    n_all[cols] = n
    mu_all[cols] = mu
    var_all[cols] = var
    base_all[cols] = base
    rejected_all[cols] = rejected

    limit_hit = (above | overflow) & p.explosion
    return _Triggers(
        fired=statistical | limit_hit,
        critical=(statistical & (deviations >= p.log_critical_ratio)) | limit_hit,
        value=norm,
        baseline=np.where(above, p.ceiling, np.nan),
        log_baseline=np.where(statistical | (overflow & (samples > 0)), log_base, np.nan),
    )


def _vanish(
    norm: NDArray[np.float64],
    new: NDArray[np.bool_],
    skipped: NDArray[np.bool_],
    p: _Params,
    streak_all: NDArray[np.int64],
    cols: NDArray[np.int64],
) -> _Triggers:
    """Vanishing triggers; updates the streaks of the batch's series in place."""
    rows, width = norm.shape
    sample = np.isfinite(norm) & new[:, None] & ~skipped[:, None]
    below = sample & (norm < p.floor)
    reset = sample & ~below
    below_total = np.cumsum(below, axis=0)
    order = np.arange(rows)[:, None]
    last_reset = np.maximum.accumulate(np.where(reset, order, -1), axis=0)
    before = np.take_along_axis(below_total, np.maximum(last_reset, 0), axis=0)
    since: NDArray[np.int64] = below_total - np.where(last_reset >= 0, before, 0)
    streak = since + np.where(last_reset >= 0, 0, streak_all[cols])
    if rows:
        streak_all[cols] = streak[-1]
    fired = below & (streak >= p.consecutive) & p.vanishing
    return _Triggers(
        fired=fired,
        critical=np.zeros((rows, width), np.bool_),
        value=norm,
        baseline=np.broadcast_to(p.floor, (rows, width)),
    )


def _nonfinite(
    norm: NDArray[np.float64],
    counts: NDArray[np.int64],
    counts_total: NDArray[np.int64],
    skipped: NDArray[np.bool_],
    p: _Params,
) -> _Triggers:
    """Non-finite triggers (stateless): per layer by count, at run level by count or norm."""
    rows, width = norm.shape
    fired = np.empty((rows, width), np.bool_)
    fired[:, 0] = (counts_total > 0) | (~np.isfinite(norm[:, 0]) & ~skipped)
    fired[:, 1:] = counts > 0
    fired &= p.nonfinite
    value = np.empty((rows, width), np.float64)
    value[:, 0] = counts_total
    value[:, 1:] = counts
    return _Triggers(
        fired=fired,
        critical=np.ones((rows, width), np.bool_),
        value=value,
        baseline=np.full((rows, width), np.nan),
    )


def _clip_rate(
    clip_coef: NDArray[np.floating[Any]],
    new: NDArray[np.bool_],
    thresholds: ClipRateThresholds,
    bits: NDArray[np.bool_],
    width: int,
) -> tuple[NDArray[np.bool_], _Triggers | None]:
    """Clip-rate triggers at run level and the new window (the last ``window_steps`` bits)."""
    window = thresholds.window_steps
    clipped = np.asarray(clip_coef, np.float64)[new] < 1.0
    joined = np.concatenate([bits[-window:], clipped])
    kept = joined[-window:].copy()
    if not thresholds.enabled:
        return kept, None
    rows = len(new)
    total = np.concatenate([[0], np.cumsum(joined, dtype=np.int64)])
    ends = np.arange(len(joined) - len(clipped), len(joined)) + 1
    full = ends >= window
    in_window = total[ends] - total[np.maximum(ends - window, 0)]
    fraction = in_window / window
    fired_new = full & (fraction > thresholds.max_fraction)
    fired = np.zeros((rows, width), np.bool_)
    value = np.zeros((rows, width), np.float64)
    fired[new, 0] = fired_new
    value[new, 0] = fraction
    return kept, _Triggers(
        fired=fired,
        critical=np.zeros((rows, width), np.bool_),
        value=value,
        baseline=np.full((rows, width), thresholds.max_fraction),
    )


def _merge(
    rule: Rule,
    found: _Triggers,
    steps: NDArray[np.int64],
    names: Sequence[str],
    last: NDArray[np.int64],
    cooldown: NDArray[np.int64],
) -> list[tuple[int, Detection]]:
    """Group one rule's triggers into events per series (vectorised), with ``continues``."""
    series, row = np.nonzero(found.fired.T)
    if not len(series):
        return []
    at = steps[row]
    gap_limit = cooldown[series]
    first_of_series = np.ones(len(series), np.bool_)
    first_of_series[1:] = series[1:] != series[:-1]
    previous = np.empty_like(at)
    previous[1:] = at[:-1]
    previous[first_of_series] = last[series[first_of_series]]
    had_previous = previous != _NO_STEP
    within = had_previous & (np.abs(at - np.where(had_previous, previous, 0)) <= gap_limit)
    starts = first_of_series | ~within
    start_index = np.flatnonzero(starts)
    group = np.cumsum(starts) - 1
    value = found.value[row, series]
    critical = found.critical[row, series]
    key = value if rule is Rule.VANISHING else -value
    order = np.lexsort((np.arange(len(series)), key, group))
    peak = order[np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])]
    end_index = np.r_[start_index[1:], len(series)] - 1
    count = np.diff(np.r_[start_index, len(series)])
    severe = np.maximum.reduceat(critical.astype(np.int8), start_index)
    baseline = found.baseline[row[peak], series[peak]]
    log_baseline = (
        np.full(len(peak), np.nan)
        if found.log_baseline is None
        else found.log_baseline[row[peak], series[peak]]
    )
    continues = first_of_series[start_index] & within[start_index]
    out: list[tuple[int, Detection]] = []
    for g in range(len(start_index)):
        begin, finish, top = int(start_index[g]), int(end_index[g]), int(peak[g])
        logged, plain = float(log_baseline[g]), float(baseline[g])
        out.append(
            (
                int(series[begin]),
                Detection(
                    rule=rule,
                    layer=names[int(series[begin])],
                    severity=Severity.CRITICAL if severe[g] else Severity.WARNING,
                    first_step=int(at[begin]),
                    last_step=int(at[finish]),
                    count=int(count[g]),
                    value=float(value[top]),
                    baseline=(
                        math.exp(logged)
                        if not math.isnan(logged)
                        else None
                        if math.isnan(plain)
                        else plain
                    ),
                    continues=bool(continues[g]),
                ),
            )
        )
    return out
