"""Detector configuration of a project: pydantic thresholds, per-layer overrides, resolution.

Each threshold is declared once, in its ``*Thresholds`` model; the ``*Override`` models (every
field optional, None keeps the project default) are derived from them."""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    create_model,
    model_validator,
)

from ..store.models import RUN_LEVEL

_MAX_STEPS = 1_000_000_000
_MAX_CLIP_WINDOW = 1_000_000

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
_LOSS_DOCS: Final = {
    "enabled": "Run the loss-spike rule (run level only).",
    "z_threshold": (
        "Robust z-score, in standard deviations of log(loss), at or above which a step is a "
        "loss spike (together with min_ratio). 6, as for gradient norms."
    ),
    "min_ratio": (
        "Smallest loss / baseline median (a factor, ≥ 1) that can be a spike. 2: a loss that "
        "doubles from one step to the next is a spike for any usual loss, and a constant loss "
        "never alarms on jitter."
    ),
    "critical_ratio": (
        "Loss / baseline median (a factor, ≥ min_ratio) from which a spike is critical. 10."
    ),
    "ceiling": (
        "Absolute loss limit (loss units); above it a step is a critical loss spike, during "
        "warm-up too. None (default): no absolute limit."
    ),
    "warmup_steps": (
        "Baseline samples (finite, positive losses of new, not skipped steps) before the "
        "z-score and ratio tests start. 200, as for gradient norms."
    ),
    "cooldown_steps": (
        "Loss spikes within this many steps of the previous one merge into one event. 100."
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


class LossThresholds(ExplosionThresholds):
    """Loss-spike rule (run level only): the explosion rule's robust log-space baseline and
    tests, applied to the loss. Judged in log space, so only positive losses are samples: a
    loss that is zero or negative (some likelihoods, GAN losses) never fires it, and a NaN
    loss is a missing one. A loss that overflowed to +Inf on a step that was not skipped is a
    critical spike. The other fields mean what they mean for ``explosion``."""

    enabled: StrictBool = Field(default=True, description=_LOSS_DOCS["enabled"])
    z_threshold: _Positive = Field(default=6.0, description=_LOSS_DOCS["z_threshold"])
    min_ratio: _Ratio = Field(default=2.0, description=_LOSS_DOCS["min_ratio"])
    critical_ratio: _Ratio = Field(default=10.0, description=_LOSS_DOCS["critical_ratio"])
    ceiling: _Positive | None = Field(default=None, description=_LOSS_DOCS["ceiling"])
    warmup_steps: _Steps = Field(default=200, description=_LOSS_DOCS["warmup_steps"])
    cooldown_steps: _Cooldown = Field(default=100, description=_LOSS_DOCS["cooldown_steps"])


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
    loss: LossThresholds = LossThresholds()
    cooldown_steps: _Cooldown = Field(default=100, description=_COOLDOWN_DOC)


def _override_of(
    model: type[_Frozen], name: str, notes: dict[str, str] | None = None
) -> type[_Frozen]:
    """Derive the partial form of a thresholds model: every field optional, None by default.

    Types, constraints and descriptions are the thresholds model's (``notes`` appends to a
    description), so each threshold is declared once.
    """
    fields: dict[str, Any] = {}
    for field, info in model.model_fields.items():
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        description = (info.description or "") + (notes or {}).get(field, "")
        fields[field] = (annotation | None, Field(default=None, description=description))
    return create_model(
        name,
        __base__=_Frozen,
        __module__=__name__,
        __doc__=f"Partial :class:`{model.__name__}`: a None field keeps the project default.",
        **fields,
    )


if TYPE_CHECKING:
    ExplosionOverride: TypeAlias = _Frozen
    VanishingOverride: TypeAlias = _Frozen
    NonFiniteOverride: TypeAlias = _Frozen
else:
    ExplosionOverride = _override_of(
        ExplosionThresholds,
        "ExplosionOverride",
        {"ceiling": " In an override, None keeps the project's ceiling."},
    )
    VanishingOverride = _override_of(VanishingThresholds, "VanishingOverride")
    NonFiniteOverride = _override_of(NonFiniteThresholds, "NonFiniteOverride")


class LayerOverride(_Frozen):
    """Thresholds for the layers whose name matches ``pattern``; unset fields fall back to the
    project defaults. There is no ``clip_rate`` or ``loss`` section: both are run level only."""

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
