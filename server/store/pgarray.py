"""NumPy arrays as PostgreSQL array parameters in binary form, for psycopg 3.

psycopg dumps a Python list element by element (a Python call per value); a batch's thousand
series times eight summary columns made that the largest single cost of the ingest
transaction on PostgreSQL. Here the whole array is one buffer written by NumPy: the binary
array header, then one ``(length, big-endian value)`` pair per element. NULL elements are not
representable (every element is 8 bytes); callers turn a sentinel (NaN, -1) into NULL in SQL
with ``NULLIF``.

Imported only on the PostgreSQL path (psycopg is an optional dependency). Pure; thread-safe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from psycopg import Connection
from psycopg.adapt import Dumper
from psycopg.pq import Format

__all__ = ["Float8Array", "Int8Array", "register_array_dumpers"]

_INT8, _INT8_ARRAY = 20, 1016
_FLOAT8, _FLOAT8_ARRAY = 701, 1022


@dataclass(frozen=True, slots=True)
class Int8Array:
    """A 1-D array to send as ``bigint[]`` (no NULL elements)."""

    values: NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Float8Array:
    """A 1-D array to send as ``float8[]`` (NaN and ±Inf as such; no NULL elements)."""

    values: NDArray[np.float64]


def _pack(values: NDArray[np.generic], element_oid: int, dtype: str) -> bytes:
    """PostgreSQL's binary array format of a 1-D array with no NULLs."""
    n = len(values)
    if n == 0:
        return struct.pack(">iiI", 0, 0, element_oid)
    header = struct.pack(">iiIii", 1, 0, element_oid, n, 1)  # ndim, has NULL, oid, size, lbound
    body = np.empty(n, dtype=[("length", ">i4"), ("value", dtype)])
    body["length"] = 8
    body["value"] = values
    return header + body.tobytes()


class _Int8ArrayDumper(Dumper):
    format = Format.BINARY
    oid = _INT8_ARRAY

    def dump(self, obj: Int8Array) -> bytes:
        return _pack(obj.values, _INT8, ">i8")


class _Float8ArrayDumper(Dumper):
    format = Format.BINARY
    oid = _FLOAT8_ARRAY

    def dump(self, obj: Float8Array) -> bytes:
        return _pack(obj.values, _FLOAT8, ">f8")


def register_array_dumpers(connection: Connection[object]) -> None:
    """Let ``connection`` dump :class:`Int8Array` and :class:`Float8Array` parameters
    (idempotent; cheap enough to call before every statement that uses them)."""
    connection.adapters.register_dumper(Int8Array, _Int8ArrayDumper)
    connection.adapters.register_dumper(Float8Array, _Float8ArrayDumper)
