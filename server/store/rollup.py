"""Chunk rollups: the per-layer maximum and NaN count of each per-layer metric, per run and
1,024-step chunk, kept at ingest so a whole-run heatmap reads a few rows per chunk instead of
every block of every layer.

One row per (run, metric, chunk) holds three packed arrays over the run's layer series (see
``models.Rollup``). The values are folded per step, not per block: a batch that spans a chunk
boundary adds to both chunks, so a chunk's maximum is exact for the steps it covers and a
one-step spike is never lost nor moved. Ingest folds each batch under the run's lock
(:func:`fold_into_rollups`); migration 0004 builds the rows of runs stored before
(:func:`rebuild_rollups`). Session contract as in :mod:`gradwatch.server.store` (the caller
owns the transaction; every call blocks on the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from .block import StoredBlock, decode_blocks
from .metric import METRICS, Metric, Scope
from .models import Block, Rollup, Series
from .series import BLOCK_COLUMNS

__all__ = [
    "CHUNK_STEPS",
    "ChunkMaxima",
    "RollupCells",
    "chunk_maxima",
    "fold_into_rollups",
    "read_rollups",
    "rebuild_rollups",
]

CHUNK_STEPS = 1024
"""Steps per rollup chunk: chunk ``c`` covers steps ``c * CHUNK_STEPS .. (c + 1) * CHUNK_STEPS
- 1``. A heatmap bucket at least this wide is read from rollups."""

_ROLLUPS = cast(Table, Rollup.__table__)
_IDS = np.dtype("<i8")
_FLOATS = np.dtype("<f8")


@dataclass(frozen=True, slots=True)
class ChunkMaxima:
    """One batch's values of ``S`` series folded per chunk: row ``i`` is chunk ``chunk[i]``.

    ``vmax`` is NaN where every present value is NaN; ``present`` is False where the series
    has no value in the chunk (then ``vmax`` and ``nan_count`` are meaningless).
    """

    chunk: NDArray[np.int64]
    vmax: NDArray[np.float64]
    nan_count: NDArray[np.int64]
    present: NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class RollupCells:
    """Stored rollups of a chunk range, one entry per (chunk, series) holding a value."""

    chunk: NDArray[np.int64]
    series_id: NDArray[np.int64]
    vmax: NDArray[np.float64]
    nan_count: NDArray[np.int64]


def chunk_maxima(
    steps: NDArray[np.int64],
    values: NDArray[np.float32] | NDArray[np.int64],
    present: NDArray[np.bool_] | None,
) -> ChunkMaxima:
    """Fold ``(n, S)`` values at strictly increasing ``steps`` into per-chunk maxima.

    Pure NumPy (one ``reduceat`` per statistic); thread-safe, no I/O.
    """
    wide = values.astype(np.float64)
    if present is None:
        present = np.ones(wide.shape, dtype=np.bool_)
    chunk_of_step = steps // CHUNK_STEPS
    starts = np.flatnonzero(np.r_[True, chunk_of_step[1:] != chunk_of_step[:-1]])
    nan = np.isnan(wide) & present
    usable = present & ~nan
    vmax = np.maximum.reduceat(np.where(usable, wide, -np.inf), starts, axis=0)
    vmax[~np.logical_or.reduceat(usable, starts, axis=0)] = np.nan
    return ChunkMaxima(
        chunk=chunk_of_step[starts],
        vmax=vmax,
        nan_count=np.add.reduceat(nan, starts, axis=0, dtype=np.int64),
        present=np.logical_or.reduceat(present, starts, axis=0),
    )


def fold_into_rollups(
    session: Session,
    run_id: str,
    metric: Metric,
    series_ids: NDArray[np.int64],
    maxima: ChunkMaxima,
) -> None:
    """Fold one batch's chunk maxima of ``series_ids`` (column order of ``maxima``) into the
    run's stored rollups: one read and one write per chunk the batch touches.

    Call under the run's lock (ingest holds it), so no other writer folds the same rows.
    """
    connection = session.connection()
    chunks = maxima.chunk.tolist()
    stored = {
        int(row.chunk): row
        for row in connection.execute(
            select(_ROLLUPS).where(
                Rollup.run_id == run_id, Rollup.metric == metric.value, Rollup.chunk.in_(chunks)
            )
        )
    }
    new: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for i, chunk in enumerate(chunks):
        keep = maxima.present[i]
        ids, vmax, nans = series_ids[keep], maxima.vmax[i][keep], maxima.nan_count[i][keep]
        row = stored.get(chunk)
        if row is not None:
            ids, vmax, nans = _merge(
                np.frombuffer(row.series, dtype=_IDS),
                np.frombuffer(row.vmax, dtype=_FLOATS),
                np.frombuffer(row.nan_count, dtype=_IDS),
                ids,
                vmax,
                nans,
            )
        key = {"run_id": run_id, "metric": metric.value, "chunk": chunk}
        (new if row is None else changed).append({**key, **_pack(ids, vmax, nans)})
    if changed:
        connection.execute(_UPDATE_ROLLUP, [_as_update(row) for row in changed])
    if new:
        connection.execute(insert(_ROLLUPS), new)


_UPDATE_ROLLUP = (
    update(_ROLLUPS)
    .where(
        Rollup.run_id == bindparam("key_run_id"),
        Rollup.metric == bindparam("key_metric"),
        Rollup.chunk == bindparam("key_chunk"),
    )
    .values(series=bindparam("series"), vmax=bindparam("vmax"), nan_count=bindparam("nan_count"))
)


def _as_update(row: dict[str, Any]) -> dict[str, Any]:
    """Parameters of ``_UPDATE_ROLLUP`` for a row (bound names may not be column names)."""
    return {
        "key_run_id": row["run_id"],
        "key_metric": row["metric"],
        "key_chunk": row["chunk"],
        "series": row["series"],
        "vmax": row["vmax"],
        "nan_count": row["nan_count"],
    }


def read_rollups(
    session: Session, run_id: str, metric: Metric, first_chunk: int, last_chunk: int
) -> RollupCells:
    """Return the stored rollups of chunks ``first_chunk..last_chunk`` (one primary-key range
    scan; a few rows per chunk whatever the number of layers)."""
    rows = (
        session.connection()
        .execute(
            select(Rollup.chunk, Rollup.series, Rollup.vmax, Rollup.nan_count).where(
                Rollup.run_id == run_id,
                Rollup.metric == metric.value,
                Rollup.chunk >= first_chunk,
                Rollup.chunk <= last_chunk,
            )
        )
        .all()
    )
    series = [np.frombuffer(row.series, dtype=_IDS) for row in rows]
    lengths = np.fromiter((len(s) for s in series), dtype=np.int64, count=len(series))
    return RollupCells(
        chunk=np.repeat(np.fromiter((r.chunk for r in rows), np.int64, len(rows)), lengths),
        series_id=_concat(series, _IDS).astype(np.int64),
        vmax=_concat([np.frombuffer(r.vmax, dtype=_FLOATS) for r in rows], _FLOATS).astype(
            np.float64
        ),
        nan_count=_concat([np.frombuffer(r.nan_count, dtype=_IDS) for r in rows], _IDS).astype(
            np.int64
        ),
    )


def rebuild_rollups(connection: Connection) -> None:
    """(Re)build the rollups of every stored run from its blocks (migration 0004's backfill).

    Decodes one series at a time and writes each (run, metric) once, so memory stays at one
    run's rollups plus one series' values; blocks for minutes on a database of 10⁹ values.
    """
    connection.execute(_ROLLUPS.delete())
    layer_metrics = [m.value for m, spec in METRICS.items() if spec.scope is Scope.LAYER]
    listing = connection.execute(
        select(Series.run_id, Series.metric, Series.id)
        .where(Series.metric.in_(layer_metrics))
        .order_by(Series.run_id, Series.metric, Series.id)
    ).all()
    by_key: dict[tuple[str, str], list[int]] = {}
    for run_id, metric, series_id in listing:
        by_key.setdefault((run_id, metric), []).append(int(series_id))
    for (run_id, metric), series_ids in by_key.items():
        parts = [_series_cells(connection, Metric(metric), s) for s in series_ids]
        cells = RollupCells(
            chunk=np.concatenate([p.chunk for p in parts]),
            series_id=np.concatenate([p.series_id for p in parts]),
            vmax=np.concatenate([p.vmax for p in parts]),
            nan_count=np.concatenate([p.nan_count for p in parts]),
        )
        order = np.lexsort((cells.series_id, cells.chunk))
        chunk = cells.chunk[order]
        bounds = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1], True])
        rows = [
            {
                "run_id": run_id,
                "metric": metric,
                "chunk": int(chunk[a]),
                **_pack(
                    cells.series_id[order[a:b]], cells.vmax[order[a:b]], cells.nan_count[order[a:b]]
                ),
            }
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]
        if rows:
            connection.execute(insert(_ROLLUPS), rows)


def _series_cells(connection: Connection, metric: Metric, series_id: int) -> RollupCells:
    """The chunk maxima of one stored series, decoded from its blocks."""
    blocks = [
        StoredBlock(*row)
        for row in connection.execute(
            select(*BLOCK_COLUMNS).where(Block.series_id == series_id).order_by(Block.first_step)
        )
    ]
    steps, values = decode_blocks(blocks, METRICS[metric].kind)
    if not len(steps):
        empty = np.zeros(0, dtype=np.int64)
        return RollupCells(empty, empty, np.zeros(0), empty)
    maxima = chunk_maxima(steps, values.reshape(-1, 1), None)
    return RollupCells(
        chunk=maxima.chunk,
        series_id=np.full(len(maxima.chunk), series_id, dtype=np.int64),
        vmax=maxima.vmax[:, 0],
        nan_count=maxima.nan_count[:, 0],
    )


def _merge(
    old_ids: NDArray[np.int64],
    old_vmax: NDArray[np.float64],
    old_nans: NDArray[np.int64],
    ids: NDArray[np.int64],
    vmax: NDArray[np.float64],
    nans: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64]]:
    """Union of two series sets: maxima (NaN only when both are NaN) and summed NaN counts."""
    if np.array_equal(old_ids, ids):  # the same series as before, in the same order
        return ids, np.fmax(old_vmax, vmax), old_nans + nans
    merged = np.union1d(old_ids, ids)
    out_vmax = np.full(len(merged), np.nan)
    out_nans = np.zeros(len(merged), dtype=np.int64)
    for part_ids, part_vmax, part_nans in ((old_ids, old_vmax, old_nans), (ids, vmax, nans)):
        at = np.searchsorted(merged, part_ids)
        out_vmax[at] = np.fmax(out_vmax[at], part_vmax)
        out_nans[at] += part_nans
    return merged, out_vmax, out_nans


def _pack(
    ids: NDArray[np.int64], vmax: NDArray[np.float64], nans: NDArray[np.int64]
) -> dict[str, bytes]:
    order = np.argsort(ids, kind="stable")
    return {
        "series": ids[order].astype(_IDS).tobytes(),
        "vmax": vmax[order].astype(_FLOATS).tobytes(),
        "nan_count": nans[order].astype(_IDS).tobytes(),
    }


def _concat(parts: Sequence[NDArray[Any]], dtype: np.dtype[Any]) -> NDArray[Any]:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
