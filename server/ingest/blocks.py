"""Storing a prepared batch: block rows, the series' running summaries and the chunk rollups.

Runs inside ingest's transaction under the run's lock (see :mod:`.batch`); blocks on the
database; not thread-safe per session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from ..store import series as series_store
from ..store import summary as summary_store
from ..store.block import BlockSet, concat_blocks
from ..store.metric import Metric
from ..store.rollup import ChunkMaxima, fold_into_rollups
from ..store.summary import RunSummaries

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


def store_blocks(
    session: Session,
    run_id: str,
    metrics: Sequence[MetricBlocks],
    remembered: RunSummaries | None = None,
) -> RunSummaries | None:
    """Store the blocks of a batch, fold them into the series summaries and the rollups.

    Call under the run's lock, in the ingest transaction; blocks on the database. The series'
    summaries (``remembered``, or read in one query) are folded with NumPy over every series
    of the batch at once (:func:`~gradwatch.server.store.summary.fold_blocks`) and written in
    one statement; the block rows go in with one ``COPY`` or executemany.

    Args:
        remembered: Every series of the run with its summary as stored now (see :mod:`.memo`);
            None reads them.

    Returns:
        Every series of the run with its summary after this batch (None for no metrics).
    """
    if not metrics:
        return remembered
    keys = [(item.metric.value, layer) for item in metrics for layer in item.layers]
    blocks = concat_blocks([item.blocks for item in metrics])
    run = summary_store.read_summaries(session, run_id) if remembered is None else remembered
    has_values = blocks.count > 0
    missing = [
        key
        for key, present in zip(keys, has_values.tolist(), strict=True)
        if present and key not in run.position
    ]
    if missing:
        series_store.insert_series(session, run_id, missing)
        run = summary_store.read_summaries(session, run_id)
    position = np.fromiter(
        (run.position.get(key, -1) for key in keys), dtype=np.intp, count=len(keys)
    )
    stored = np.flatnonzero(has_values)
    new_blocks = blocks.take(stored)
    old = run.summaries.take(position[stored])
    series_store.insert_blocks(session, old.id, new_blocks)
    folded = summary_store.fold_blocks(old, new_blocks)
    summary_store.write_summaries(session, folded)
    series_ids = np.full(len(keys), -1, dtype=np.int64)  # -1: no series (no value yet)
    known = position >= 0
    series_ids[known] = run.summaries.id[position[known]]
    offset = 0
    for item in metrics:
        width = len(item.layers)
        if item.maxima is not None:
            ids = series_ids[offset : offset + width]
            fold_into_rollups(session, run_id, item.metric, ids, item.maxima)
        offset += width
    return RunSummaries(run.position, run.summaries.put(position[stored], folded))
