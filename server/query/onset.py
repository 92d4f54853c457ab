"""A stored event's onset analysis as its reply model, and the one-line summary of it.

Pure (no I/O): thread-safe, never blocks. What an onset means is :mod:`gradwatch.server.detect.
onset`; this module only words it.
"""

from __future__ import annotations

import logging

from ..detect.event import Rule
from ..detect.onset import Onset
from ..event_schemas import OnsetLayerOut, OnsetOut
from ..store.models import Event

__all__ = ["event_summary", "onset_out"]

_logger = logging.getLogger(__name__)


def onset_out(event: Event) -> OnsetOut | None:
    """The onset of a stored event, or None when it has none (or an unreadable one, logged)."""
    if event.onset is None:
        return None
    try:
        onset = Onset.from_json(event.onset)
    except ValueError as error:
        # Not ours to fail a whole page of events over: the event itself is still right.
        _logger.warning("event %s: %s", event.id, error)
        return None
    return OnsetOut(
        summary=_summary(Rule(event.rule), onset),
        global_step=onset.global_step,
        loss_step=onset.loss_step,
        layers=[
            OnsetLayerOut(
                layer=layer,
                step=step,
                steps_before_global=None if onset.global_step is None else onset.global_step - step,
            )
            for layer, step in onset.layers
        ],
        departed_layers=onset.departed,
        first_nonfinite_forward=onset.nonfinite_forward,
        first_nonfinite_backward=onset.nonfinite_backward,
    )


def event_summary(event: Event) -> str | None:
    """``"<rule> from step N: <onset summary>"``, or None when the event has no onset."""
    out = onset_out(event)
    if out is None:
        return None
    return f"{event.rule} from step {event.first_step:,}: {out.summary}"


def _summary(rule: Rule, onset: Onset) -> str:
    """E.g. "first: `dense_3` at step 41,012, 3 steps before the global norm; loss at its
    baseline"."""
    parts = [_gradients(onset)] if rule is Rule.LOSS else []
    if onset.layers or rule is not Rule.LOSS:
        first = _first_layer(onset)
        if onset.departed > 1:
            first += f" ({onset.departed} layers off their baselines)"
        parts.append(first)
    if rule is not Rule.LOSS:
        parts.append(_loss(onset))
    if onset.nonfinite_backward is not None:
        backward, forward = onset.nonfinite_backward, onset.nonfinite_forward
        text = f"first non-finite layer: `{backward}` from the output side"
        if forward != backward:
            text += f", `{forward}` from the input side"
        parts.append(text)
    return "; ".join(parts)


def _first_layer(onset: Onset) -> str:
    if not onset.layers:
        return "first: no layer off its baseline"
    layer, step = onset.layers[0]
    text = f"first: `{layer}` at step {step:,}"
    if onset.global_step is None:
        return text + ", the global norm at its baseline"
    gap = onset.global_step - step
    if gap == 0:
        return text + ", the same step as the global norm"
    when = "before" if gap > 0 else "after"
    return text + f", {abs(gap):,} step{'s' if abs(gap) != 1 else ''} {when} the global norm"


def _loss(onset: Onset) -> str:
    if onset.loss_step is None:
        return "loss at its baseline"
    return f"loss off its baseline from step {onset.loss_step:,}"


def _gradients(onset: Onset) -> str:
    if onset.global_step is None:
        return "gradients quiet (global norm at its baseline)"
    return f"global norm off its baseline from step {onset.global_step:,}"
