"""Gradient-health detection: detector configuration, state codec, rules and event service.

The pure part (no I/O, thread-safe) is re-exported here: :func:`detect` runs every rule over one
batch (:mod:`.detector`, rules in :mod:`.rules`), with a project's :class:`DetectorConfig`
(:mod:`.config`) and a run's :class:`DetectorState` (:mod:`.state`); new run-level
explosion, non-finite and loss events carry an :class:`Onset` (:mod:`.onset`). :mod:`.service`
stores the resulting events and reads and writes project configs.
"""

from .config import (
    ClipRateThresholds,
    DetectorConfig,
    ExplosionOverride,
    ExplosionThresholds,
    LayerOverride,
    LossThresholds,
    NonFiniteOverride,
    NonFiniteThresholds,
    Thresholds,
    VanishingOverride,
    VanishingThresholds,
)
from .detector import DetectResult, detect
from .event import Detection, Rule, Severity, StepColumns
from .onset import Onset
from .state import DetectorState, StateFormatError

__all__ = [
    "ClipRateThresholds",
    "DetectResult",
    "Detection",
    "DetectorConfig",
    "DetectorState",
    "ExplosionOverride",
    "ExplosionThresholds",
    "LayerOverride",
    "LossThresholds",
    "NonFiniteOverride",
    "NonFiniteThresholds",
    "Onset",
    "Rule",
    "Severity",
    "StateFormatError",
    "StepColumns",
    "Thresholds",
    "VanishingOverride",
    "VanishingThresholds",
    "detect",
]
