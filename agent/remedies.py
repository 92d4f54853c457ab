"""What the seed's clip policies would have made of a replayed gradient (``gradwatch replay``).

Pure NumPy over the replayed gradients; no TensorFlow. Thread-safe (no shared state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Remedy", "remedies"]


@dataclass(frozen=True, slots=True)
class Remedy:
    """A clip policy applied to the replayed gradient: its threshold, and the result."""

    name: str
    threshold: float
    finite: bool
    global_norm: float
    note: str


def remedies(manifest: dict[str, Any], grads: list[Any]) -> list[Remedy]:
    """The replayed gradient after ``global_norm``, ``by_value`` and ``zclip`` at the run's
    thresholds (its policy's where it had one, else from the recorded norms before the
    step: their median for ``global_norm``, 1 for ``by_value``, mean + 2.5 σ for ``zclip``).

    Args:
        manifest: The bundle's manifest (policy, step, recorded rows).
        grads: The replayed gradients (NumPy arrays, ``None`` for a variable without one).
    """
    present = [g.astype(np.float64) for g in grads if g is not None]
    with np.errstate(all="ignore"):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in present))
    history = [
        float(row["global_norm"])
        for row in manifest.get("recorded", [])
        if row["step"] < manifest["step"] and math.isfinite(float(row["global_norm"]))
    ]
    typical = float(np.median(history)) if history else 1.0
    policy = _policy_thresholds(manifest.get("policy"))
    remedies = []
    limit = policy.get("global_norm", typical)
    if math.isfinite(norm):
        remedies.append(Remedy("global_norm", limit, True, min(norm, limit), "scaled to the limit"))
    else:
        remedies.append(
            Remedy("global_norm", limit, True, 0.0, "a non-finite norm becomes a zero update")
        )
    value = policy.get("by_value", 1.0)
    clipped = [np.clip(g, -value, value) for g in present]
    with np.errstate(all="ignore"):
        clipped_norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in clipped))
    remedies.append(
        Remedy(
            "by_value",
            value,
            math.isfinite(clipped_norm),
            clipped_norm,
            (
                "NaN passes through"
                if not math.isfinite(clipped_norm)
                else "±Inf clipped to the limit"
                if not math.isfinite(norm)
                else "each value clipped to ±limit"
            ),
        )
    )
    mean = float(np.mean(history)) if history else typical
    std = float(np.std(history)) if history else 0.0
    threshold = mean + 2.5 * std
    if math.isfinite(norm):
        remedies.append(
            Remedy("zclip", threshold, True, min(norm, threshold), "z = 2.5 of the recorded norms")
        )
    else:
        remedies.append(
            Remedy("zclip", threshold, False, math.nan, "a non-finite norm cannot be scaled down")
        )
    return remedies


def _policy_thresholds(policy: Any) -> dict[str, float]:
    """``global_norm``/``by_value`` limits of the run's policy (searched through chains)."""
    found: dict[str, float] = {}
    stack = [policy]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("policy") == "global_norm" and "max_norm" in item:
                found["global_norm"] = float(item["max_norm"])
            if item.get("policy") == "by_value" and "limit" in item:
                found["by_value"] = float(item["limit"])
            stack.extend(item.get("policies", []))
    return found
