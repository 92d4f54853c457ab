"""Per-run detector state and its versioned binary codec (``GWDS``), stored with the run."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from .event import RULES

NO_STEP: Final = np.iinfo(np.int64).min
"""``last_trigger`` of a (rule, series) that never triggered; ``departure`` of a series at its
baseline."""


class StateFormatError(ValueError):
    """Stored detector state that this version cannot read (unknown version, truncated)."""


# --------------------------------------------------------------------------- state

_MAGIC: Final = b"GWDS"
_VERSION: Final = 2
_HEADER: Final = struct.Struct("<4sB")
_BODY_V1: Final = struct.Struct("<?qII")
_BODY: Final = struct.Struct("<?qIIB")
"""Version 2 adds the count of rule columns (version 1 had 4) and the departure steps."""
_FLOAT: Final = np.dtype("<f8")
_INT: Final = np.dtype("<i8")
_COUNT: Final = np.dtype("<u4")


class DetectorState:
    """All per-series detector state of one run, keyed by series (layer name, ``""`` = run
    level). Immutable by convention: :func:`detect` returns a new state and never modifies the
    one it is given, so a state may be shared between threads.

    Per series: the explosion baseline (samples ``n``, level ``mu``, scale ``var``, baseline
    ``b`` in log units, consecutive rejected samples), the vanishing streak, the step of the
    last trigger of each rule and the departure step (:mod:`.onset`); per run: the clip-rate
    window bits and ``last_step``. The loss has a series of its own
    (:data:`.event.LOSS_SERIES`) once a batch carried one. About 90 bytes per series plus its
    name before compression;
    :meth:`to_bytes` is compact, versioned and lossless.
    """

    __slots__ = (
        "_base",
        "_clip_bits",
        "_departure",
        "_index",
        "_last_step",
        "_last_trigger",
        "_mu",
        "_n",
        "_rejected",
        "_series",
        "_streak",
        "_var",
    )

    def __init__(
        self,
        series: tuple[str, ...] = (),
        *,
        n: NDArray[np.int64] | None = None,
        mu: NDArray[np.float64] | None = None,
        var: NDArray[np.float64] | None = None,
        base: NDArray[np.float64] | None = None,
        rejected: NDArray[np.int64] | None = None,
        streak: NDArray[np.int64] | None = None,
        last_trigger: NDArray[np.int64] | None = None,
        departure: NDArray[np.int64] | None = None,
        clip_bits: NDArray[np.bool_] | None = None,
        last_step: int | None = None,
    ) -> None:
        """Build a state; arrays default to the fresh state of every series.

        Args:
            series: Series names (unique; ``""`` is the run level).
            n, mu, var, base, rejected, streak: ``(S,)`` per-series values.
            last_trigger: ``(S, R)`` step of the last trigger per rule (``Rule`` order).
            departure: ``(S,)`` step from which each series is off its baseline, or
                ``NO_STEP``.
            clip_bits: The clip window, oldest first (True = clipped).
            last_step: Last step processed by the stateful rules.
        """
        size = len(series)
        self._series = series
        self._index = {name: i for i, name in enumerate(series)}
        if len(self._index) != size:
            raise ValueError("series names must be unique")
        self._n = np.zeros(size, np.int64) if n is None else n
        self._mu = np.zeros(size, np.float64) if mu is None else mu
        self._var = np.zeros(size, np.float64) if var is None else var
        self._base = np.zeros(size, np.float64) if base is None else base
        self._rejected = np.zeros(size, np.int64) if rejected is None else rejected
        self._streak = np.zeros(size, np.int64) if streak is None else streak
        self._last_trigger = (
            np.full((size, len(RULES)), NO_STEP, np.int64) if last_trigger is None else last_trigger
        )
        self._departure = np.full(size, NO_STEP, np.int64) if departure is None else departure
        self._clip_bits = np.zeros(0, np.bool_) if clip_bits is None else clip_bits
        self._last_step = last_step
        for name in ("_n", "_mu", "_var", "_base", "_rejected", "_streak", "_departure"):
            if getattr(self, name).shape != (size,):
                raise ValueError(f"{name[1:]}: expected shape ({size},)")
        if self._last_trigger.shape != (size, len(RULES)):
            raise ValueError(f"last_trigger: expected shape ({size}, {len(RULES)})")

    @property
    def series(self) -> tuple[str, ...]:
        """Names of the series with state, in the order they first appeared."""
        return self._series

    @property
    def last_step(self) -> int | None:
        """Last step processed by the stateful rules; None before any step."""
        return self._last_step

    def baseline(self, layer: str) -> float | None:
        """The explosion baseline median (norm units) of a series; None before any sample."""
        index = self._index.get(layer)
        if index is None or self._n[index] == 0:
            return None
        return math.exp(float(self._base[index]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DetectorState):
            return NotImplemented
        return (
            self._series == other._series
            and self._last_step == other._last_step
            and all(
                np.array_equal(getattr(self, name), getattr(other, name))
                for name in (
                    "_n",
                    "_mu",
                    "_var",
                    "_base",
                    "_rejected",
                    "_streak",
                    "_last_trigger",
                    "_departure",
                    "_clip_bits",
                )
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"DetectorState(series={len(self._series)}, last_step={self._last_step}, "
            f"clip_bits={len(self._clip_bits)})"
        )

    def to_bytes(self) -> bytes:
        """Serialise losslessly: a 5-byte header (magic ``GWDS``, version 2), then a zlib
        stream of little-endian fields and arrays. Pure; about 25-40 bytes per series
        (12.7 kB for 500 layers)."""
        names = [name.encode("utf-8") for name in self._series]
        parts = [
            _BODY.pack(
                self._last_step is not None,
                0 if self._last_step is None else self._last_step,
                len(names),
                len(self._clip_bits),
                len(RULES),
            ),
            np.asarray([len(name) for name in names], _COUNT).tobytes(),
            b"".join(names),
            self._n.astype(_INT).tobytes(),
            self._mu.astype(_FLOAT).tobytes(),
            self._var.astype(_FLOAT).tobytes(),
            self._base.astype(_FLOAT).tobytes(),
            self._rejected.astype(_INT).tobytes(),
            self._streak.astype(_INT).tobytes(),
            self._last_trigger.astype(_INT).tobytes(),
            self._departure.astype(_INT).tobytes(),
            np.packbits(self._clip_bits).tobytes(),
        ]
        return _HEADER.pack(_MAGIC, _VERSION) + zlib.compress(b"".join(parts), 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> DetectorState:
        """Read what :meth:`to_bytes` wrote, or a version 1 state (before the loss rule and
        departures: every series at its baseline, the loss rule never triggered).

        Raises:
            StateFormatError: Not a detector state, an unknown version, more rules than this
                server knows, or truncated.
        """
        if len(data) < _HEADER.size:
            raise StateFormatError("detector state: too short")
        magic, version = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise StateFormatError("detector state: bad magic (not a gradwatch detector state)")
        if version not in (1, _VERSION):
            raise StateFormatError(
                f"detector state: unsupported version {version} (this server reads 1 to {_VERSION})"
            )
        try:
            body = zlib.decompress(data[_HEADER.size :])
        except zlib.error as error:
            raise StateFormatError(f"detector state: corrupt ({error})") from None
        reader = _Reader(body)
        if version == 1:
            has_last, last_step, size, clip_len = reader.unpack(_BODY_V1)
            rules = 4
        else:
            has_last, last_step, size, clip_len, rules = reader.unpack(_BODY)
        if rules > len(RULES):
            raise StateFormatError(
                f"detector state: {rules} rules, this server knows {len(RULES)} (written by a "
                "newer server)"
            )
        lengths = reader.array(_COUNT, size)
        blob = reader.take(int(lengths.sum()))
        ends = np.cumsum(lengths)
        try:
            series = tuple(
                blob[end - length : end].decode("utf-8")
                for end, length in zip(ends.tolist(), lengths.tolist(), strict=True)
            )
        except UnicodeDecodeError as error:
            raise StateFormatError(f"detector state: bad series name ({error})") from None
        n = reader.array(_INT, size)
        mu = reader.array(_FLOAT, size)
        var = reader.array(_FLOAT, size)
        base = reader.array(_FLOAT, size)
        rejected = reader.array(_INT, size)
        streak = reader.array(_INT, size)
        last_trigger = np.full((size, len(RULES)), NO_STEP, np.int64)
        last_trigger[:, :rules] = reader.array(_INT, size * rules).reshape(size, rules)
        departure = reader.array(_INT, size) if version > 1 else None
        packed = reader.array(np.dtype(np.uint8), (clip_len + 7) // 8)
        reader.finish()
        try:
            return cls(
                series,
                n=n,
                mu=mu,
                var=var,
                base=base,
                rejected=rejected,
                streak=streak,
                last_trigger=last_trigger,
                departure=departure,
                clip_bits=np.unpackbits(packed, count=clip_len).astype(np.bool_),
                last_step=int(last_step) if has_last else None,
            )
        except ValueError as error:
            raise StateFormatError(f"detector state: {error}") from None


class _Reader:
    """Sequential reads from a bytes body, raising :class:`StateFormatError` on truncation."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._offset = 0

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._body):
            raise StateFormatError("detector state: truncated")
        chunk = self._body[self._offset : end]
        self._offset = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def array(self, dtype: np.dtype[Any], count: int) -> NDArray[Any]:
        raw = self.take(dtype.itemsize * count)
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)

    def finish(self) -> None:
        if self._offset != len(self._body):
            raise StateFormatError("detector state: trailing bytes")
