"""Onset analysis: which layer left its baseline first when a run-level event starts.

Pure NumPy and plain values: thread-safe, never blocks.

Design (the cheapest correct one found): the explosion baseline already decides, per series
and per sample, whether a sample is *rejected* (``z > reject_z``, 3σ of log(norm) above the
baseline median: the baseline refuses to learn from it). A series has *left its baseline*
from the first sample of its current run of rejected samples, or from a step where it was
non-finite (NaN/Inf values counted, or a NaN/Inf norm on a step that was not skipped), until
its next accepted sample (or a re-learnt level). The detector keeps that *departure step*
per series in its state (``DetectorState``, one int64 per series) and updates it inside the
per-step loop it already runs, with a few vectorised operations over all series; nothing is
re-read from storage and no loop runs per layer. When a run-level ``explosion``,
``nonfinite`` or ``loss`` event *starts*, the departure steps as they stand after its first
step are turned into an :class:`Onset` (only then; a continuation keeps the stored one).

Because the departure steps are detector state, which is bit-for-bit the same whatever the
batch split (and resent batches never reach the detectors), so is every onset. The
alternative, re-reading a look-back window of every layer's stored series when an event
starts, would cost one query and a decode of L series per event and need the baselines as
they were before the onset, which the state no longer holds.

Reading an onset: layers are ordered by departure step, then in *backward* order (the output
side, the end of the run's layer order, first): within one step backpropagation reaches the
output side first, so that is where a same-step departure most likely started. Departures
are judged by the same 3σ as the baseline's rejection, so in a run of many layers a layer
or two may show a one-step departure at the event's first step by chance; a true onset
leads by several steps. A permanent level shift counts as departed until the level is
re-learnt (``relearn_steps``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from .state import NO_STEP

__all__ = ["ONSET_LAYERS", "Onset", "onset_at"]

ONSET_LAYERS: Final = 10
"""Most layers an onset lists (the first ones); ``departed`` says how many there were."""


@dataclass(frozen=True, slots=True)
class Onset:
    """The departures from baseline at the first step of a run-level event.

    Attributes:
        global_step: Step from which the global norm was off its baseline, or None when it
            was not (yet) at the event's first step.
        loss_step: The same for the loss; None when the loss was at its baseline or the run
            sends no loss.
        layers: ``(layer, step)`` of the first :data:`ONSET_LAYERS` departed layers, by
            step, then output side first.
        departed: How many layers had departed (``len(layers)`` or more).
        nonfinite_forward: Of the layers non-finite at the event's first step, the first in
            the run's layer order (input side); None when none was.
        nonfinite_backward: The same in backward order (output side first: where
            backpropagation produced the first NaN/Inf of that step).
    """

    global_step: int | None
    loss_step: int | None
    layers: tuple[tuple[str, int], ...]
    departed: int
    nonfinite_forward: str | None
    nonfinite_backward: str | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (how it is stored with the event)."""
        return {
            "global_step": self.global_step,
            "loss_step": self.loss_step,
            "layers": [[layer, step] for layer, step in self.layers],
            "departed": self.departed,
            "nonfinite_forward": self.nonfinite_forward,
            "nonfinite_backward": self.nonfinite_backward,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Onset:
        """Read what :meth:`to_json` wrote.

        Raises:
            ValueError: ``data`` is not a stored onset (missing or mistyped fields).
        """
        try:
            layers = tuple((_text(name), _step(step)) for name, step in data["layers"])
            return cls(
                global_step=_optional_step(data["global_step"]),
                loss_step=_optional_step(data["loss_step"]),
                layers=layers,
                departed=_step(data["departed"]),
                nonfinite_forward=_optional_text(data["nonfinite_forward"]),
                nonfinite_backward=_optional_text(data["nonfinite_backward"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a stored onset: {error!r}") from None


def onset_at(
    layers: Sequence[str],
    departure: NDArray[np.int64],
    nonfinite: NDArray[np.bool_],
    loss_column: int | None,
) -> Onset:
    """Build the onset of an event from one step's detector columns.

    Args:
        layers: The batch's layers, in the run's order (columns ``1..L``).
        departure: ``(S,)`` departure step per column after that step (``NO_STEP``: at
            baseline); column 0 is the global norm.
        nonfinite: ``(S,)`` which columns were non-finite at that step.
        loss_column: The loss column, or None when the batch has no loss.
    """
    width = len(layers)
    steps = departure[1 : width + 1]
    index = np.flatnonzero(steps != NO_STEP)
    order = index[np.lexsort((-index, steps[index]))]
    bad = np.flatnonzero(nonfinite[1 : width + 1])
    return Onset(
        global_step=_known(departure[0]),
        loss_step=None if loss_column is None else _known(departure[loss_column]),
        layers=tuple((layers[i], int(steps[i])) for i in order[:ONSET_LAYERS].tolist()),
        departed=len(index),
        nonfinite_forward=layers[int(bad[0])] if len(bad) else None,
        nonfinite_backward=layers[int(bad[-1])] if len(bad) else None,
    )


def _known(step: np.int64) -> int | None:
    return None if step == NO_STEP else int(step)


def _step(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an int, got {value!r}")
    return value


def _optional_step(value: Any) -> int | None:
    return None if value is None else _step(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)
