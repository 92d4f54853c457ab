"""Storing a prepared batch: block rows, the series' running summaries and the chunk rollups.

Runs inside ingest's transaction under the run's lock (see :mod:`.batch`); blocks on the
database; not thread-safe per session.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from ..store import series as series_store
from ..store.block import BlockSet
from ..store.metric import Metric
from ..store.rollup import ChunkMaxima, fold_into_rollups
from ..store.series import SeriesKey, SeriesState

__all__ = ["MetricBlocks", "store_blocks"]


@dataclass(frozen=True, slots=True)
class MetricBlocks:
    """The blocks of one metric of a batch, with its heatmap rollup."""

    metric: Metric
    layers: tuple[str, ...]
    """Layer of each block column; ``("",)`` for run-level metrics."""
    blocks: BlockSet
    maxima: ChunkMaxima | None
    """Per-chunk maxima of a per-layer metric (its heatmap rollup); None for run-level ones."""


@dataclass(frozen=True, slots=True)
class _BlockSummary:
    """Summary of one block, NaN standing for "none" as in ``BlockSet``."""

    count: int
    nan_count: int
    first_step: int
    last_step: int
    vmin: float
    vmax: float
    vlast: float
    vsum: float


def store_blocks(session: Session, run_id: str, metrics: Sequence[MetricBlocks]) -> None:
    """Store the blocks of a batch, fold them into the series summaries and the rollups.

    Call under the run's lock, in the ingest transaction; blocks on the database.
    """
    states = series_store.get_series_states(session, run_id)
    missing: list[SeriesKey] = [
        (item.metric.value, layer)
        for item in metrics
        for layer, count in zip(item.layers, item.blocks.count.tolist(), strict=True)
        if count > 0 and (item.metric.value, layer) not in states
    ]
    if missing:
        series_store.insert_series(session, run_id, missing)
        states = series_store.get_series_states(session, run_id)
    rows: list[dict[str, object]] = []
    updated: list[SeriesState] = []
    for item in metrics:
        blocks = item.blocks
        summaries = map(
            _BlockSummary,
            blocks.count.tolist(),
            blocks.nan_count.tolist(),
            blocks.first_step.tolist(),
            blocks.last_step.tolist(),
            blocks.vmin.tolist(),
            blocks.vmax.tolist(),
            blocks.vlast.tolist(),
            blocks.vsum.tolist(),
        )
        for j, (layer, summary) in enumerate(zip(item.layers, summaries, strict=True)):
            if summary.count == 0:
                continue
            state = states[(item.metric.value, layer)]
            rows.append(
                {
                    "series_id": state.id,
                    "first_step": summary.first_step,
                    "last_step": summary.last_step,
                    "count": summary.count,
                    "nan_count": summary.nan_count,
                    "vmin": _null_if_nan(summary.vmin),
                    "vmax": _null_if_nan(summary.vmax),
                    "vlast": _null_if_nan(summary.vlast),
                    "steps": blocks.steps[j],
                    "values": blocks.values[j],
                }
            )
            updated.append(_merge_state(state, summary))
    series_store.insert_blocks(session, rows)
    series_store.update_series_states(session, updated)
    for item in metrics:
        if item.maxima is not None:
            ids = [
                getattr(states.get((item.metric.value, layer)), "id", -1) for layer in item.layers
            ]
            fold_into_rollups(session, run_id, item.metric, np.array(ids), item.maxima)


def _null_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def _merge_state(state: SeriesState, block: _BlockSummary) -> SeriesState:
    """Fold one block into a series' running summary (NULL conventions of ``models.Series``)."""
    old_sum = 0.0 if state.count == 0 else (math.nan if state.vsum is None else state.vsum)
    is_last = state.last_step is None or block.last_step > state.last_step
    return SeriesState(
        id=state.id,
        count=state.count + block.count,
        nan_count=state.nan_count + block.nan_count,
        vmin=_fold(state.vmin, block.vmin, min),
        vmax=_fold(state.vmax, block.vmax, max),
        vsum=_null_if_nan(old_sum + block.vsum),
        last_step=block.last_step if is_last else state.last_step,
        vlast=_null_if_nan(block.vlast) if is_last else state.vlast,
    )


def _fold(old: float | None, new: float, pick: Callable[[float, float], float]) -> float | None:
    if math.isnan(new):
        return old
    return new if old is None else pick(old, new)
