"""The binary ``StepBatch`` body: MessagePack with raw little-endian arrays (schema 1).

The same batch as the JSON body (DESIGN.md §5), for a client that has NumPy arrays at hand:
sent with ``Content-Type:`` :data:`MEDIA_TYPE` (gzip allowed, as for JSON) to
``POST /api/v1/runs/{run_id}/batches``. A MessagePack map with string keys, each once:

- ``schema``, ``batch_id``, ``layers``, ``dropped_batches``, ``incidents``: as in JSON
  (MessagePack integers, strings, arrays and maps);
- every numeric column (:data:`COLUMNS`) is one MessagePack ``bin``: the column's values in
  step order (a per-layer column step-major: step 0's layers, then step 1's, …) as the
  column's little-endian dtype. Floats are IEEE float32, so NaN and ±Inf travel as
  themselves and every value is stored exactly as sent;
- ``measured`` (optional): a map from an optional column (``loss``, ``weight_norm``,
  ``update_ratio``) to a ``bin`` of one byte per value of that column, 1 where the value
  was measured and 0 where JSON would send ``null``. Without it every value is measured.

The server applies the JSON body's rules and answers with the same error types, locations
and messages where the defect is the same (a negative count, steps out of order, an unknown
field…); what only a binary body can get wrong (a column's length in bytes) is named too.

Pure functions and constants: thread-safe, never block. :func:`pack` is the encoder the
agent uses; :func:`unpack` the strict decoder the server uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from gradwatch.wire import DuplicateKeyError, unique_keys

__all__ = ["COLUMNS", "MEASURED", "MEDIA_TYPE", "Column", "UnpackError", "pack", "unpack"]

MEDIA_TYPE: Final = "application/vnd.gradwatch.batch+msgpack"
"""``Content-Type`` of a binary batch body."""

MEASURED: Final = "measured"
"""Key of the map of measured-masks of the optional columns."""


@dataclass(frozen=True, slots=True)
class Column:
    """How one numeric column travels.

    Attributes:
        dtype: Little-endian NumPy dtype of its values (``|u1`` booleans are 0 or 1).
        per_layer: One value per step and layer (else one per step).
        optional: May be left out, and may have unmeasured values (see :data:`MEASURED`).
    """

    dtype: np.dtype[Any]
    per_layer: bool
    optional: bool

    @property
    def type_name(self) -> str:
        """The dtype as the error messages name it (``float32``, ``int64``, ``uint8``)."""
        return str(self.dtype.newbyteorder("="))


_F4, _I8, _U1 = np.dtype("<f4"), np.dtype("<i8"), np.dtype("|u1")

COLUMNS: Final[Mapping[str, Column]] = {
    "step": Column(_I8, per_layer=False, optional=False),
    "loss": Column(_F4, per_layer=False, optional=True),
    "global_norm": Column(_F4, per_layer=False, optional=False),
    "global_norm_clipped": Column(_F4, per_layer=False, optional=False),
    "clip_coef": Column(_F4, per_layer=False, optional=False),
    "skipped": Column(_U1, per_layer=False, optional=False),
    "grad_norm": Column(_F4, per_layer=True, optional=False),
    "nonfinite": Column(_I8, per_layer=True, optional=False),
    "weight_norm": Column(_F4, per_layer=True, optional=True),
    "update_ratio": Column(_F4, per_layer=True, optional=True),
}
"""Every numeric column of a batch, in the order the JSON body lists them."""


class UnpackError(ValueError):
    """A body that is not one well-formed MessagePack map (the message says why)."""


def pack(
    fields: Mapping[str, Any],
    columns: Mapping[str, npt.NDArray[Any]],
    measured: Mapping[str, npt.NDArray[np.bool_]] | None = None,
) -> bytes:
    """Encode a batch as a binary body.

    Args:
        fields: The non-numeric fields (``schema``, ``batch_id``, ``layers``, …), as in JSON.
        columns: Numeric columns by name (:data:`COLUMNS`), any shape, in step-major order;
            each is converted to its column's dtype.
        measured: Per optional column, its measured-mask (same size); omitted when all of a
            column was measured.
    """
    body: dict[str, Any] = dict(fields)
    for name, values in columns.items():
        body[name] = np.ascontiguousarray(values, dtype=COLUMNS[name].dtype).tobytes()
    masks = {
        name: np.ascontiguousarray(mask, dtype=_U1).tobytes()
        for name, mask in (measured or {}).items()
    }
    if masks:
        body[MEASURED] = masks
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _no_extension(code: int, data: bytes) -> Any:
    raise UnpackError(f"MessagePack extension type {code} is not part of a batch")


def unpack(body: bytes) -> Any:
    """Decode one MessagePack value, strictly. Blocks for CPU time (~0.1 ms a 500-layer batch).

    Map keys must be strings (or bytes) and appear once; extension types (timestamps
    included) and bytes after the value are refused; strings must be UTF-8.

    Raises:
        UnpackError: Any of the above, or a truncated or malformed body.
    """
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=unique_keys,
            ext_hook=_no_extension,
            timestamp=0,
        )
    except DuplicateKeyError as error:
        key = error.key
        shown = key[:100] if isinstance(key, str | bytes) else key
        raise UnpackError(f"map has the key {shown!r} more than once; send each key once") from None
    except UnpackError:
        raise
    except msgpack.ExtraData:
        raise UnpackError("bytes after the MessagePack value; send one map") from None
    except msgpack.StackError:
        raise UnpackError("nested too deeply for this server to decode") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        raise UnpackError(f"not MessagePack ({type(error).__name__}: {error})"[:300]) from None
