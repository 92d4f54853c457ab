"""The running summaries of a run's series (``models.Series``) as arrays: read in one query,
folded with a batch's blocks by NumPy over all series at once, written in one statement.

Before, every series of a batch (about a thousand at 500 layers) was read into a dataclass,
merged with its block in Python and written back as a list of Python values; that per-series
work was the largest part of the server's CPU per batch. The fold here keeps the NULL
conventions of ``models.Series`` exactly (NaN stands for NULL in float columns, ``NO_STEP`` for
a NULL ``last_step``; see :func:`fold_blocks`).

Session contract as in :mod:`gradwatch.server.store` (the caller owns the transaction; calls
that take a session block on the database and are not thread-safe per session).
:func:`fold_blocks` and :class:`Summaries` are pure and thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from .block import BlockSet
from .models import Series

__all__ = [
    "NO_STEP",
    "RunSummaries",
    "Summaries",
    "fold_blocks",
    "nullable",
    "read_summaries",
    "write_summaries",
]

NO_STEP = -1
"""``last_step`` of a series that holds no sample yet (NULL in the table; steps are ≥ 0)."""


@dataclass(frozen=True, slots=True)
class Summaries:
    """The running summaries of ``S`` series, column-wise (entry ``j`` is one series).

    Float columns hold NaN where the table holds NULL: ``vmin``/``vmax`` when no non-NaN value
    was stored, ``vsum`` when the sum is undefined (no value yet, or +Inf and -Inf both seen),
    ``vlast`` when the value at ``last_step`` is NaN. ``last_step`` is ``NO_STEP`` when NULL.
    """

    id: NDArray[np.int64]
    count: NDArray[np.int64]
    nan_count: NDArray[np.int64]
    vmin: NDArray[np.float64]
    vmax: NDArray[np.float64]
    vsum: NDArray[np.float64]
    last_step: NDArray[np.int64]
    vlast: NDArray[np.float64]

    def take(self, index: NDArray[np.intp]) -> Summaries:
        """The summaries of the series at ``index`` (positions), in that order."""
        return Summaries(
            id=self.id[index],
            count=self.count[index],
            nan_count=self.nan_count[index],
            vmin=self.vmin[index],
            vmax=self.vmax[index],
            vsum=self.vsum[index],
            last_step=self.last_step[index],
            vlast=self.vlast[index],
        )

    def put(self, index: NDArray[np.intp], new: Summaries) -> Summaries:
        """A copy with the series at ``index`` (positions) replaced by ``new``'s, in order."""
        columns = {}
        for field in fields(self):
            column = getattr(self, field.name).copy()
            column[index] = getattr(new, field.name)
            columns[field.name] = column
        return Summaries(**columns)


@dataclass(frozen=True, slots=True)
class RunSummaries:
    """Every series of a run: where each (metric, layer) is in ``summaries``."""

    position: dict[tuple[str, str], int]
    summaries: Summaries


_READ_COLUMNS = (
    Series.metric,
    Series.layer,
    Series.id,
    Series.count,
    Series.nan_count,
    Series.vmin,
    Series.vmax,
    Series.vsum,
    func.coalesce(Series.last_step, NO_STEP),
    Series.vlast,
)


def read_summaries(session: Session, run_id: str) -> RunSummaries:
    """Read every series of a run with its running summary (one query, Core rows)."""
    statement = select(*_READ_COLUMNS).where(Series.run_id == run_id)
    rows = session.connection().execute(statement).all()
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * 10
    metrics, layers = columns[0], columns[1]
    ints = [np.array(column, dtype=np.int64) for column in (columns[2:5] + columns[8:9])]
    # None (SQL NULL) becomes NaN in a float array.
    floats = [np.array(column, dtype=np.float64) for column in (columns[5:8] + columns[9:10])]
    return RunSummaries(
        position={key: i for i, key in enumerate(zip(metrics, layers, strict=True))},
        summaries=Summaries(
            id=ints[0],
            count=ints[1],
            nan_count=ints[2],
            vmin=floats[0],
            vmax=floats[1],
            vsum=floats[2],
            last_step=ints[3],
            vlast=floats[3],
        ),
    )


def fold_blocks(old: Summaries, blocks: BlockSet) -> Summaries:
    """Fold block ``j`` into the summary of series ``j``, for every ``j`` at once.

    Every block must hold at least one value (``count > 0``). The rules, NaN standing for NULL:
    counts add up; ``vmin``/``vmax`` keep the old value where the block's is NaN, take the
    block's where the old one is NaN, else the smaller/larger one (the old one on a tie, so
    ``-0.0`` and ``0.0`` keep whichever came first); ``vsum`` adds the block's sum to the old one
    (0 for a series without samples; NaN stays NaN, +Inf plus -Inf is NaN); the block's
    ``last_step`` and ``vlast`` replace the old ones when its last step is later.

    Pure NumPy (a constant number of array operations); thread-safe.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf is NaN: undefined, on purpose
        vsum = np.where(old.count == 0, 0.0, old.vsum) + blocks.vsum
    is_last = (old.last_step == NO_STEP) | (blocks.last_step > old.last_step)
    return Summaries(
        id=old.id,
        count=old.count + blocks.count,
        nan_count=old.nan_count + blocks.nan_count,
        vmin=_fold(old.vmin, blocks.vmin, blocks.vmin < old.vmin),
        vmax=_fold(old.vmax, blocks.vmax, blocks.vmax > old.vmax),
        vsum=vsum,
        last_step=np.where(is_last, blocks.last_step, old.last_step),
        vlast=np.where(is_last, blocks.vlast, old.vlast),
    )


def _fold(
    old: NDArray[np.float64], new: NDArray[np.float64], better: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """``new`` where it is not NaN and the old value is NaN or ``better`` says so, else old."""
    return np.where(np.isnan(new), old, np.where(np.isnan(old) | better, new, old))


def nullable(values: NDArray[np.float64]) -> list[float | None]:
    """Python floats with None for NaN (SQL NULL), for a driver's parameters."""
    nan = np.isnan(values)
    if not nan.any():
        return values.tolist()  # type: ignore[no-any-return]
    objects = values.astype(object)
    objects[nan] = None
    return objects.tolist()  # type: ignore[no-any-return]


def write_summaries(session: Session, summaries: Summaries) -> None:
    """Write the running summaries of the series in ``summaries``, by id (one statement).

    PostgreSQL: one ``UPDATE ... FROM unnest(<arrays>)``; with psycopg 3 each array travels as
    one binary buffer written by NumPy (:mod:`.pgarray`), NaN and ``NO_STEP`` turned into NULL
    by the statement. SQLite: one executemany straight to the driver, which runs in-process.
    """
    if not len(summaries.id):
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        if connection.dialect.driver == "psycopg":
            from .pgarray import Float8Array, Int8Array, register_array_dumpers

            driver = connection.connection.driver_connection
            assert driver is not None
            register_array_dumpers(driver)  # type: ignore[arg-type]
            params: dict[str, object] = {
                name: (Float8Array if kind == "float8" else Int8Array)(getattr(summaries, name))
                for name, kind in zip(_FIELDS, _SQL_TYPES, strict=True)
            }
        else:
            params = {name: getattr(summaries, name).tolist() for name in _FIELDS}
        session.execute(_UPDATE_FROM_ARRAYS, params)
        return
    connection.exec_driver_sql(
        _UPDATE_BY_ID,
        list(
            zip(
                summaries.count.tolist(),
                summaries.nan_count.tolist(),
                nullable(summaries.vmin),
                nullable(summaries.vmax),
                nullable(summaries.vsum),
                [None if step == NO_STEP else step for step in summaries.last_step.tolist()],
                nullable(summaries.vlast),
                summaries.id.tolist(),
                strict=True,
            )
        ),
    )


_FIELDS = ("id", "count", "nan_count", "vmin", "vmax", "vsum", "last_step", "vlast")
_SQL_TYPES = ("bigint", "bigint", "bigint", "float8", "float8", "float8", "bigint", "float8")
_NULL_IF = {
    "vmin": "'NaN'",
    "vmax": "'NaN'",
    "vsum": "'NaN'",
    "last_step": str(NO_STEP),
    "vlast": "'NaN'",
}
_UPDATE_BY_ID = (  # SQLite's qmark parameters, the id last
    "UPDATE series SET " + ", ".join(f"{name} = ?" for name in _FIELDS[1:]) + " WHERE id = ?"
)
_UPDATE_FROM_ARRAYS = text(
    "UPDATE series SET "
    + ", ".join(
        f"{name} = NULLIF(v.{name}, {_NULL_IF[name]})" if name in _NULL_IF else f"{name} = v.{name}"
        for name in _FIELDS[1:]
    )
    + " FROM unnest("
    + ", ".join(
        f"CAST(:{name} AS {kind}[])" for name, kind in zip(_FIELDS, _SQL_TYPES, strict=True)
    )
    + ") AS v("
    + ", ".join(_FIELDS)
    + ") WHERE series.id = v.id"
)
