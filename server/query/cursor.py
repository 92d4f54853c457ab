"""Opaque keyset-pagination cursors: a JSON list of the last row's sort key, base64url-encoded.

Pure functions; thread-safe; never block.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from ..errors import InvalidQueryError

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(position: Sequence[int | str]) -> str:
    """Encode a sort key (ints and strings) as a URL-safe cursor."""
    raw = json.dumps(list(position)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, types: Sequence[type], endpoint: str) -> list[int | str]:
    """Decode a cursor made by :func:`encode_cursor` whose items have the given types.

    Raises:
        InvalidQueryError: The cursor is not one ``endpoint`` returned.
    """
    message = f"cursor: not a cursor returned by {endpoint} (pass next_cursor unchanged)"
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError) as error:
        raise InvalidQueryError(message) from error
    if not isinstance(position, list) or len(position) != len(types):
        raise InvalidQueryError(message)
    if not all(type(item) is kind for item, kind in zip(position, types, strict=True)):
        raise InvalidQueryError(message)
    return position
