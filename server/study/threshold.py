"""The threshold rule: fixed clip limits chosen from a short unclipped warm-up.

The fixed-threshold remedies (``by_value``, ``by_norm``, ``global_norm``) need a limit, and a
limit tuned by hand per cell would answer a different question (how well can someone tune
it). The study instead trains each optimizer for a few steps at its low (stable) learning
rate without a remedy, reads back the norms gradwatch recorded, and sets, with
``P = percentile`` (50 by default, the median) over the warm-up's finite norms:

* ``global_norm(max_norm)``: ``max_norm = P(global norm)``: a typical step sits at the limit.
* ``by_norm(max_norm)``: ``max_norm = max over layers of P(layer norm)``: the largest
  layer's typical norm, so in a typical step no tensor is clipped (a tensor's norm is at most
  its layer's) and a spike in any layer is.
* ``by_value(limit)``: ``limit = 3 · P(global norm) / √N``, N the trainable parameter
  count: three times the root-mean-square gradient element of a typical step (about the
  largest element of a Gaussian-like gradient of a few thousand values).

Adaptive remedies (``zclip``, ``autoclip``) calibrate themselves; the study only sets their
warm-up to the same number of steps. Pure NumPy; no TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["VALUE_FACTOR", "Thresholds", "choose_thresholds"]

VALUE_FACTOR = 3.0
"""``by_value``'s limit in root-mean-square gradient elements of a typical warm-up step."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The fixed clip limits of one optimizer's cells.

    Attributes:
        global_norm: ``max_norm`` of ``clip.global_norm`` (an L2 norm, the gradient's units).
        tensor_norm: ``max_norm`` of ``clip.by_norm`` (per tensor).
        value: ``limit`` of ``clip.by_value`` (per element).
        percentile: The percentile of the warm-up norms used, in (0, 100].
        warmup_steps: Finite warm-up steps the limits come from.
    """

    global_norm: float
    tensor_norm: float
    value: float
    percentile: float
    warmup_steps: int

    def as_dict(self) -> dict[str, float | int]:
        """The limits as a JSON-ready dict."""
        return {
            "global_norm": self.global_norm,
            "tensor_norm": self.tensor_norm,
            "value": self.value,
            "percentile": self.percentile,
            "warmup_steps": self.warmup_steps,
        }


def _finite_positive(values: Sequence[float]) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array) & (array > 0.0)]


def choose_thresholds(
    global_norms: Sequence[float],
    layer_norms: Mapping[str, Sequence[float]],
    num_parameters: int,
    percentile: float = 50.0,
) -> Thresholds:
    """Apply the module's rule to one warm-up's norms. Pure; never blocks.

    Args:
        global_norms: The warm-up's global gradient norm per step (NaN/Inf and zeros are
            left out: they carry no scale).
        layer_norms: Per layer, its gradient norm per step (same filtering).
        num_parameters: Trainable parameters of the model (≥ 1).
        percentile: Which percentile of the norms, in (0, 100] (linear interpolation, as
            ``numpy.percentile``).

    Raises:
        ValueError: No finite positive global norm, a bad ``percentile`` or
            ``num_parameters``.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    if num_parameters < 1:
        raise ValueError(f"num_parameters: expected ≥ 1, got {num_parameters!r}")
    norms = _finite_positive(global_norms)
    if norms.size == 0:
        raise ValueError("the warm-up recorded no finite, non-zero global norm")
    global_limit = float(np.percentile(norms, percentile))
    per_layer = [_finite_positive(values) for values in layer_norms.values()]
    layer_limits = [float(np.percentile(v, percentile)) for v in per_layer if v.size]
    # Without per-layer data the global limit bounds every tensor too.
    tensor_limit = max(layer_limits) if layer_limits else global_limit
    value_limit = VALUE_FACTOR * global_limit / math.sqrt(num_parameters)
    return Thresholds(
        global_norm=global_limit,
        tensor_norm=tensor_limit,
        value=value_limit,
        percentile=float(percentile),
        warmup_steps=int(norms.size),
    )
