"""Divergence detection on a run's per-step training loss.

A run *diverged* at step ``s`` when either

* its loss is NaN or ±Inf at ``s`` (the first such step), or
* from ``s`` to the end of the run its smoothed loss (the trailing median of ``window`` steps,
  so one bad batch is not a divergence) stays above ``factor`` × the run's initial loss (its
  first finite loss, measured on the initial weights, so the same for every cell of a study),
  and ``s`` is where that final stretch began: the first step of the unbroken run of raw
  losses above the limit that leads into it, or
* the loss on held-out data after training (when given) is non-finite or above that limit:
  the run ended in a blown-up state that the smoothing hid (a spike in its last steps);
  ``s`` is then its last step.

A run whose loss spikes and comes back has not diverged; a run that ends far worse than it
started has, even when its numbers stay finite (a tanh RNN's loss saturates rather than
overflowing). Pure NumPy; no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DIVERGENCE_FACTOR", "SMOOTHING_STEPS", "find_divergence"]

DIVERGENCE_FACTOR = 3.0
"""A run whose smoothed loss ends above this many times its initial loss has diverged."""

SMOOTHING_STEPS = 10
"""Window of the trailing median, in steps."""


def find_divergence(
    steps: Sequence[int],
    losses: Sequence[float],
    final_loss: float | None = None,
    factor: float = DIVERGENCE_FACTOR,
    window: int = SMOOTHING_STEPS,
) -> int | None:
    """The step where the run diverged, or ``None``. Pure; never blocks.

    Args:
        steps: Step numbers, increasing.
        losses: The training loss at each step (NaN/±Inf allowed).
        final_loss: The held-out loss after training, or None when unknown.
        factor: Multiple of the initial loss above which the smoothed loss counts as
            diverged (> 1).
        window: Steps in the trailing median (≥ 1).

    Raises:
        ValueError: ``steps`` and ``losses`` differ in length, or a bad ``factor``/``window``.
    """
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    if factor <= 1.0 or window < 1:
        raise ValueError(f"factor must be > 1 and window ≥ 1, got {factor!r}, {window!r}")
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        return None
    finite = np.isfinite(values)
    if not finite.all():
        return int(steps[int(np.argmin(finite))])
    limit = factor * abs(float(values[0]))
    if limit == 0.0:  # a perfect start: only a non-finite loss is a divergence
        return None
    smoothed = np.array(
        [np.median(values[max(0, i - window + 1) : i + 1]) for i in range(values.size)]
    )
    above = smoothed > limit
    if not above[-1]:
        ended_badly = final_loss is not None and not (abs(final_loss) <= limit)
        return int(steps[-1]) if ended_badly else None
    # The final stretch above the limit starts after the last step at or below it.
    below = np.flatnonzero(~above)
    first = int(below[-1]) + 1 if below.size else 0
    # The median lags by up to half its window: the stretch began at the first raw loss
    # above the limit that leads into it.
    while first > 0 and values[first - 1] > limit:
        first -= 1
    return int(steps[first])
