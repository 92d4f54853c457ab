"""Block codec: one batch's values of many series ⇄ packed block rows (see ``models.Block``).

Encoding is vectorised over the steps and series of a batch (NumPy, no Python loop per
sample); only the final per-series ``tobytes`` runs once per series. Decoding concatenates
any number of blocks of one series with a constant number of NumPy operations. Pure functions,
thread-safe, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .metric import MetricKind

__all__ = [
    "BlockSet",
    "BlockSummaries",
    "StoredBlock",
    "concat_blocks",
    "decode_blocks",
    "encode_blocks",
]

_STEP_DTYPE = np.dtype("<i8")


@dataclass(frozen=True, slots=True)
class BlockSet:
    """The blocks of ``S`` series from one batch, column-wise: entry ``j`` is series ``j``.

    Float columns use NaN for SQL NULL, following ``models.Block``: ``vmin``/``vmax`` are NaN
    when no value is non-NaN, ``vlast`` is NaN when the last value is NaN, ``vsum`` (sum of the
    non-NaN values, 0 when there are none) is NaN when undefined (+Inf and -Inf both present).
    Series with ``count == 0`` have no block and their other entries are meaningless.
    """

    count: NDArray[np.int64]
    nan_count: NDArray[np.int64]
    first_step: NDArray[np.int64]
    last_step: NDArray[np.int64]
    vmin: NDArray[np.float64]
    vmax: NDArray[np.float64]
    vlast: NDArray[np.float64]
    vsum: NDArray[np.float64]
    steps: list[bytes | None]
    """Packed steps, or None when they are exactly ``first_step..last_step``."""
    values: list[bytes | None]
    """Packed values, or None when every value is bitwise equal to ``vmin`` (never NaN)."""

    def take(self, index: NDArray[np.intp]) -> BlockSet:
        """The blocks of the series at ``index`` (positions), in that order."""
        positions = index.tolist()
        return BlockSet(
            count=self.count[index],
            nan_count=self.nan_count[index],
            first_step=self.first_step[index],
            last_step=self.last_step[index],
            vmin=self.vmin[index],
            vmax=self.vmax[index],
            vlast=self.vlast[index],
            vsum=self.vsum[index],
            steps=[self.steps[i] for i in positions],
            values=[self.values[i] for i in positions],
        )


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """The columns of a stored block that decoding needs."""

    first_step: int
    last_step: int
    count: int
    vmin: float | None
    steps: bytes | None
    values: bytes | None


@dataclass(frozen=True, slots=True)
class BlockSummaries:
    """The summary columns of ``B`` stored blocks of one series, by first step (no blobs).

    Float columns use NaN for SQL NULL (see ``models.Block``): ``vmin``/``vmax`` are NaN when
    every value of the block is NaN, ``vlast`` when the last value is NaN.
    """

    first_step: NDArray[np.int64]
    last_step: NDArray[np.int64]
    count: NDArray[np.int64]
    nan_count: NDArray[np.int64]
    vmin: NDArray[np.float64]
    vmax: NDArray[np.float64]
    vlast: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.first_step)


def encode_blocks(
    steps: NDArray[np.int64],
    values: NDArray[np.float32] | NDArray[np.int64],
    present: NDArray[np.bool_] | None,
    kind: MetricKind,
) -> BlockSet:
    """Summarise and pack the values of ``S`` series over ``n`` steps.

    Args:
        steps: Shape ``(n,)``, strictly increasing.
        values: Shape ``(n, S)``; float32 for ``MetricKind.FLOAT``, int64 for ``COUNT``.
        present: Shape ``(n, S)``: False where a value was not measured (absent from the
            block); None means every value is present.
        kind: How the values are packed.

    Returns:
        One block description per series.
    """
    n, width = values.shape
    if present is None:
        present = np.ones((n, width), dtype=np.bool_)
    columns = np.arange(width)
    count = present.sum(axis=0, dtype=np.int64)
    first_index = present.argmax(axis=0)
    last_index = n - 1 - present[::-1].argmax(axis=0)
    first_step = steps[first_index]
    last_step = steps[last_index]
    wide = values.astype(np.float64)
    if kind is MetricKind.FLOAT:
        nan = np.isnan(wide) & present
        valid = present & ~nan
    else:
        nan = np.zeros_like(present)
        valid = present
    valid_count = valid.sum(axis=0)
    vmin = np.where(valid, wide, np.inf).min(axis=0)
    vmax = np.where(valid, wide, -np.inf).max(axis=0)
    vmin[valid_count == 0] = np.nan
    vmax[valid_count == 0] = np.nan
    with np.errstate(invalid="ignore"):  # +Inf + -Inf is NaN: an undefined sum, on purpose
        vsum = np.where(valid, wide, 0.0).sum(axis=0)
    vlast = wide[last_index, columns]
    nan_count = nan.sum(axis=0, dtype=np.int64)

    contiguous = last_step - first_step + 1 == count
    bits: NDArray[np.unsignedinteger[Any]] = (
        values.view(np.uint32) if kind is MetricKind.FLOAT else values.view(np.uint64)
    )
    first_value = wide[first_index, columns]
    constant = (
        ((bits == bits[first_index, columns]) | ~present).all(axis=0)
        & (nan_count == 0)
        & ~((first_value == 0) & np.signbit(first_value))
    )

    full_columns = np.asarray(present.all(axis=0), dtype=np.bool_)
    dtype = np.dtype(kind.value)
    by_series = np.ascontiguousarray(values.T, dtype=dtype)
    if full_columns.all():  # the usual batch: one bytes object, sliced per series
        packed_steps, packed_values = _pack_full(steps, by_series, constant)
    else:
        packed_steps, packed_values = _pack_sparse(
            steps, by_series, present, count > 0, full_columns, contiguous, constant
        )
    return BlockSet(
        count=count,
        nan_count=nan_count,
        first_step=first_step,
        last_step=last_step,
        vmin=vmin,
        vmax=vmax,
        vlast=vlast,
        vsum=vsum,
        steps=packed_steps,
        values=packed_values,
    )


def _pack_full(
    steps: NDArray[np.int64], by_series: NDArray[Any], constant: NDArray[np.bool_]
) -> tuple[list[bytes | None], list[bytes | None]]:
    """Packed steps and values of series that hold a value at every step."""
    width, n = by_series.shape
    contiguous = n == 0 or int(steps[-1]) - int(steps[0]) + 1 == n
    steps_blob = None if contiguous else steps.astype(_STEP_DTYPE, copy=False).tobytes()
    size = n * by_series.itemsize
    whole = by_series.tobytes()
    values = [
        None if is_constant else whole[j * size : (j + 1) * size]
        for j, is_constant in enumerate(constant.tolist())
    ]
    return [steps_blob] * width, values


def _pack_sparse(
    steps: NDArray[np.int64],
    by_series: NDArray[Any],
    present: NDArray[np.bool_],
    has_values: NDArray[np.bool_],
    full_columns: NDArray[np.bool_],
    contiguous: NDArray[np.bool_],
    constant: NDArray[np.bool_],
) -> tuple[list[bytes | None], list[bytes | None]]:
    """Packed steps and values of series some of whose values are absent, series by series."""
    packed_steps: list[bytes | None] = []
    packed_values: list[bytes | None] = []
    for j, (has_any, full, is_contiguous, is_constant) in enumerate(
        zip(
            has_values.tolist(),
            full_columns.tolist(),
            contiguous.tolist(),
            constant.tolist(),
            strict=True,
        )
    ):
        if not has_any:
            packed_steps.append(None)
            packed_values.append(None)
            continue
        own_steps = steps if full else steps[present[:, j]]
        own_values = by_series[j] if full else by_series[j][present[:, j]]
        packed_steps.append(
            None if is_contiguous else own_steps.astype(_STEP_DTYPE, copy=False).tobytes()
        )
        packed_values.append(None if is_constant else own_values.tobytes())
    return packed_steps, packed_values


def concat_blocks(sets: Sequence[BlockSet]) -> BlockSet:
    """The series of several block sets side by side, in order (at least one set)."""
    return BlockSet(
        count=np.concatenate([item.count for item in sets]),
        nan_count=np.concatenate([item.nan_count for item in sets]),
        first_step=np.concatenate([item.first_step for item in sets]),
        last_step=np.concatenate([item.last_step for item in sets]),
        vmin=np.concatenate([item.vmin for item in sets]),
        vmax=np.concatenate([item.vmax for item in sets]),
        vlast=np.concatenate([item.vlast for item in sets]),
        vsum=np.concatenate([item.vsum for item in sets]),
        steps=[blob for item in sets for blob in item.steps],
        values=[blob for item in sets for blob in item.values],
    )


def decode_blocks(
    blocks: Sequence[StoredBlock], kind: MetricKind
) -> tuple[NDArray[np.int64], NDArray[np.float32] | NDArray[np.int64]]:
    """Unpack blocks of one series into ``(steps, values)`` arrays, in block order.

    Args:
        blocks: Blocks of one series ordered by ``first_step`` (non-overlapping).
        kind: How the values were packed.

    Returns:
        Steps (int64) and values (float32 for ``FLOAT``, int64 for ``COUNT``), equally long.

    Raises:
        ValueError: A packed column does not have the length its block declares (corrupt
            storage).
    """
    dtype = np.dtype(kind.value).newbyteorder("=")
    counts = np.fromiter((block.count for block in blocks), dtype=np.int64, count=len(blocks))
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    first_steps = np.fromiter(
        (block.first_step for block in blocks), dtype=np.int64, count=len(blocks)
    )
    steps = np.arange(total, dtype=np.int64) + np.repeat(first_steps - offsets, counts)
    _scatter_packed(steps, counts, [block.steps for block in blocks], _STEP_DTYPE, "steps")

    vmins = np.fromiter(
        (0.0 if block.vmin is None else block.vmin for block in blocks),
        dtype=np.float64,
        count=len(blocks),
    )
    values = np.repeat(vmins, counts).astype(dtype)
    _scatter_packed(
        values, counts, [block.values for block in blocks], np.dtype(kind.value), "values"
    )
    return steps, values


def _scatter_packed(
    out: NDArray[np.generic],
    counts: NDArray[np.int64],
    packed: list[bytes | None],
    dtype: np.dtype[np.generic],
    column: str,
) -> None:
    has_packed = np.fromiter(
        (blob is not None for blob in packed), dtype=np.bool_, count=len(packed)
    )
    if not has_packed.any():
        return
    joined = b"".join(blob for blob in packed if blob is not None)
    expected = int(counts[has_packed].sum())
    if len(joined) != expected * dtype.itemsize:
        raise ValueError(
            f"corrupt block {column}: {len(joined)} bytes for {expected} values of {dtype}"
        )
    out[np.repeat(has_packed, counts)] = np.frombuffer(joined, dtype=dtype)
