"""SQL of the layer × step heatmap: per-layer block summaries folded into step buckets.

One grouped query covers every layer of a run (not one query per layer), and reads only the
summary columns of the blocks; :func:`fetch_layer_blocks` reads the packed values too, for
zoomed-in views whose buckets are narrower than a block. Session contract as in
:mod:`gradwatch.server.store` (caller owns the transaction; blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from .block import StoredBlock
from .metric import Metric
from .models import Block, Series
from .series import BLOCK_COLUMNS, bucket_of

__all__ = [
    "BucketCells",
    "LayerSeries",
    "bucket_layer_blocks",
    "fetch_layer_blocks",
    "list_layer_series",
    "sample_block_extent",
]


@dataclass(frozen=True, slots=True)
class LayerSeries:
    """The series of one metric for every layer of a run, in layer order."""

    layers: list[str]
    series_ids: list[int | None]
    """Series id per layer; None where the metric was never stored for that layer."""


@dataclass(frozen=True, slots=True)
class BucketCells:
    """Non-empty (series, bucket) cells, column-wise.

    ``vmax`` is NaN when every value of the cell is NaN.
    """

    series_id: NDArray[np.int64]
    bucket: NDArray[np.int64]
    nan_count: NDArray[np.int64]
    vmax: NDArray[np.float64]


def list_layer_series(session: Session, run_id: str, metric: Metric) -> LayerSeries:
    """Return the run's layers in layer order with the id of their ``metric`` series."""
    grad = (
        select(Series.layer)
        .where(Series.run_id == run_id, Series.metric == Metric.GRAD_NORM.value)
        .order_by(Series.id)
    )
    layers = list(session.execute(grad).scalars())
    ids = {
        layer: series_id
        for layer, series_id in session.execute(
            select(Series.layer, Series.id).where(
                Series.run_id == run_id, Series.metric == metric.value
            )
        )
    }
    return LayerSeries(layers, [ids.get(layer) for layer in layers])


def sample_block_extent(session: Session, series_id: int) -> tuple[int, int, int, int]:
    """Return (blocks, values, first step, last step) of one series (one aggregate query)."""
    statement = select(
        func.count(),
        func.coalesce(func.sum(Block.count), 0),
        func.coalesce(func.min(Block.first_step), 0),
        func.coalesce(func.max(Block.last_step), -1),
    ).where(Block.series_id == series_id)
    blocks, values, first, last = session.connection().execute(statement).one()
    return int(blocks), int(values), int(first), int(last)


def bucket_layer_blocks(
    session: Session,
    series_ids: Sequence[int],
    lo: int,
    hi: int,
    origin: int,
    width: int,
    lookback: int,
) -> BucketCells:
    """Fold the block summaries of many series into buckets of ``width`` steps, in SQL.

    A block belongs to the bucket of ``max(first_step, lo)``; blocks reaching into ``lo..hi``
    are included whole. SQL's ``max`` skips NULL (all-NaN blocks), so a cell whose values are
    all NaN has a NaN ``vmax``. ``lookback`` bounds how far before ``lo`` such a block may
    start (the run's longest batch, :func:`~gradwatch.server.store.runs.max_batch_span`), so
    every scan is a primary-key range no wider than the view.
    """
    if not series_ids:
        return _empty_cells()
    position = case((Block.first_step < lo, lo), else_=Block.first_step)
    bucket = bucket_of(position, origin, width).label("bucket")
    statement = (
        select(
            Block.series_id,
            bucket,
            func.sum(Block.nan_count),
            func.max(Block.vmax),
        )
        .where(
            Block.series_id.in_(series_ids),
            Block.first_step >= lo - lookback,
            Block.first_step <= hi,
            Block.last_step >= lo,
        )
        .group_by(Block.series_id, bucket)
    )
    rows = session.connection().execute(statement).all()
    if not rows:
        return _empty_cells()
    columns = list(zip(*rows, strict=True))
    series, buckets, nan_count = (np.array(c, dtype=np.int64) for c in columns[:3])
    return BucketCells(series, buckets, nan_count, np.array(columns[3], dtype=np.float64))


def fetch_layer_blocks(
    session: Session, series_ids: Sequence[int], lo: int, hi: int, lookback: int
) -> dict[int, list[StoredBlock]]:
    """Return the blocks (with packed values) of many series that reach into ``lo..hi``.

    ``lookback`` as in :func:`bucket_layer_blocks`.
    """
    statement = (
        select(Block.series_id, *BLOCK_COLUMNS)
        .where(
            Block.series_id.in_(series_ids),
            Block.first_step >= lo - lookback,
            Block.first_step <= hi,
            Block.last_step >= lo,
        )
        .order_by(Block.series_id, Block.first_step)
    )
    out: dict[int, list[StoredBlock]] = {}
    for row in session.connection().execute(statement).all():
        out.setdefault(int(row[0]), []).append(StoredBlock(*row[1:]))
    return out


def _empty_cells() -> BucketCells:
    ints = np.zeros(0, dtype=np.int64)
    return BucketCells(ints, ints, ints, np.zeros(0))
