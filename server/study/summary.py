"""The generated summary: what a study's table shows, in a few sentences.

Pure functions of the cells; no TensorFlow. The rules:

* *Diverged* is :mod:`.divergence`'s verdict.
* A remedy *rescues* an optimizer when that optimizer diverged at the high rate without a
  remedy and did not with it.
* At the low rate a remedy *costs accuracy* with an optimizer when its held-out loss is more
  than ``tolerance`` (10 %) above the unclipped run's, or not finite, or the run diverged; it
  *helps* when more than ``tolerance`` below; otherwise it is *within tolerance*.
* The best high-rate run is compared with the best low-rate run (same tolerance): keeping a
  run stable is not the same as training it well.
* Wall time per step is the median over a remedy's cells of ``relative_time``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from .result import CellResult, StudyResult, is_finite

__all__ = ["COST_TOLERANCE", "OPTIMIZER_LABELS", "label", "summarise"]

COST_TOLERANCE = 0.10
"""Relative difference in held-out loss below which a remedy neither costs nor helps."""

OPTIMIZER_LABELS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam"}


def label(optimizer: str) -> str:
    """The optimizer's display name (``sgd`` → ``SGD``)."""
    return OPTIMIZER_LABELS.get(optimizer, optimizer)


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _at(cell: CellResult) -> str:
    return f"{label(cell.optimizer)} (step {cell.diverged_at})"


def _cells(study: StudyResult, remedy: str, rate: str) -> list[CellResult]:
    return [c for c in study.cells if c.remedy == remedy and c.rate == rate]


def _high_rate_without_remedy(study: StudyResult) -> list[str]:
    cells = _cells(study, "none", "high")
    if not cells:
        return []
    diverged = [c for c in cells if c.diverged]
    stable = [label(c.optimizer) for c in cells if not c.diverged]
    if not diverged:
        return [f"At the high rate without a remedy no optimizer diverged ({_join(stable)})."]
    sentence = f"At the high rate without a remedy {_join([_at(c) for c in diverged])} diverged"
    if len(diverged) == len(cells) and len(cells) > 1:
        sentence = "At the high rate without a remedy every optimizer diverged: " + _join(
            [_at(c) for c in diverged]
        )
    if stable:
        sentence += (
            f"; {_join(stable)} stayed stable on {'its' if len(stable) == 1 else 'their'} own"
        )
    return [sentence + "."]


def _high_rate_remedies(study: StudyResult) -> list[str]:
    exploding = {c.optimizer for c in _cells(study, "none", "high") if c.diverged}
    calm = {c.optimizer for c in _cells(study, "none", "high") if not c.diverged}
    rescued_all: list[str] = []
    partial: list[str] = []
    failed: list[str] = []
    worse: list[str] = []
    for remedy in study.remedies:
        if remedy == "none":
            continue
        cells = _cells(study, remedy, "high")
        hit = [c for c in cells if c.optimizer in exploding]
        lost = [c for c in hit if c.diverged]
        if hit and not lost:
            rescued_all.append(remedy)
        elif hit and len(lost) < len(hit):
            partial.append(f"{remedy} (still diverged: {_join([_at(c) for c in lost])})")
        elif hit:
            failed.append(remedy)
        broke = [c for c in cells if c.optimizer in calm and c.diverged]
        if broke:
            worse.append(f"{remedy} ({_join([_at(c) for c in broke])})")
    out: list[str] = []
    if exploding:
        names = _join([label(o) for o in study.optimizers if o in exploding])
        if rescued_all:
            out.append(
                f"Kept training stable at the high rate where {names} diverged without a "
                f"remedy: {_join(rescued_all)}."
            )
        if partial:
            out.append(f"Kept only some of those runs stable: {_join(partial)}.")
        if failed:
            out.append(f"Did not prevent the divergence: {_join(failed)}.")
    if worse:
        out.append(f"Diverged at the high rate where no remedy did not: {_join(worse)}.")
    return out


def _best(cells: Iterable[CellResult]) -> CellResult | None:
    finite = [c for c in cells if not c.diverged and is_finite(c.final_loss)]
    return min(finite, key=lambda c: c.final_loss) if finite else None


def _high_rate_best(study: StudyResult) -> list[str]:
    best = _best(c for c in study.cells if c.rate == "high")
    if best is None:
        return ["At the high rate every run diverged or ended without a finite loss."]
    sentence = (
        f"Lowest held-out loss at the high rate: {label(best.optimizer)} with "
        f"{best.remedy} ({_num(best.final_loss)})"
    )
    plain = _best(_cells(study, "none", "high"))
    if plain is not None and plain is not best:
        sentence += f"; without a remedy {label(plain.optimizer)} ({_num(plain.final_loss)})"
    return [sentence + "."]


def _high_versus_low(study: StudyResult, tolerance: float) -> list[str]:
    high = _best(c for c in study.cells if c.rate == "high")
    low = _best(c for c in study.cells if c.rate == "low")
    if high is None or low is None or high.final_loss <= low.final_loss * (1.0 + tolerance):
        return []
    return [
        f"No run at the high rate came within {tolerance:.0%} of the best at the low rate "
        f"({label(low.optimizer)} with {low.remedy}, {_num(low.final_loss)}): a remedy that "
        "keeps a run from blowing up does not make its learning rate a good one."
    ]


def _low_rate_cost(study: StudyResult, tolerance: float) -> list[str]:
    plain = {c.optimizer: c for c in _cells(study, "none", "low")}
    costly: list[str] = []
    helped: list[str] = []
    neutral: list[str] = []
    for remedy in study.remedies:
        if remedy == "none":
            continue
        costs: list[str] = []
        gains: list[str] = []
        for cell in _cells(study, remedy, "low"):
            base = plain.get(cell.optimizer)
            if base is None or not is_finite(base.final_loss):
                continue
            pair = f"{label(cell.optimizer)} {_num(cell.final_loss)} vs {_num(base.final_loss)}"
            if cell.diverged or not is_finite(cell.final_loss):
                costs.append(f"{pair}, diverged" if cell.diverged else pair)
            elif cell.final_loss > base.final_loss * (1.0 + tolerance):
                costs.append(pair)
            elif cell.final_loss < base.final_loss * (1.0 - tolerance):
                gains.append(pair)
        if costs:
            costly.append(f"{remedy} ({'; '.join(costs)})")
        if gains:
            helped.append(f"{remedy} ({'; '.join(gains)})")
        if not costs and not gains and _cells(study, remedy, "low"):
            neutral.append(remedy)
    percent = f"{tolerance:.0%}"
    out: list[str] = []
    if costly:
        out.append(
            f"Cost accuracy at the low rate (held-out loss more than {percent} above the "
            f"unclipped run's): {_join(costly)}."
        )
    if helped:
        out.append(
            f"Lowered the held-out loss at the low rate by more than {percent}: {_join(helped)}."
        )
    if neutral:
        out.append(f"Within {percent} of the unclipped run at the low rate: {_join(neutral)}.")
    return out


def _time(study: StudyResult) -> list[str]:
    parts: list[str] = []
    for remedy in study.remedies:
        if remedy == "none":
            continue
        ratios = [
            c.relative_time
            for c in study.cells
            if c.remedy == remedy and c.relative_time is not None and is_finite(c.relative_time)
        ]
        if ratios:
            parts.append(f"{remedy} ×{statistics.median(ratios):.2f}")
    if not parts:
        return []
    return [f"Wall time per step against no remedy (median over its cells): {_join(parts)}."]


def summarise(study: StudyResult, tolerance: float = COST_TOLERANCE) -> tuple[str, ...]:
    """Sentences stating what ``study`` measured (the module's rules). Pure; never blocks."""
    return tuple(
        [
            *_high_rate_without_remedy(study),
            *_high_rate_remedies(study),
            *_high_rate_best(study),
            *_high_versus_low(study, tolerance),
            *_low_rate_cost(study, tolerance),
            *_time(study),
        ]
    )
