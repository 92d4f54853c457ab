"""Route classes that decode request bodies (gzip, size caps) and time ingest requests.

:class:`DecodedBodyRoute` reads the body itself before FastAPI parses it, so a too-large or
undecodable body is a clean 413/400/415 and endpoints still declare pydantic bodies that appear
in OpenAPI (the FastAPI "custom request and APIRoute class" pattern). JSON is parsed strictly:
bare ``NaN``/``Infinity`` tokens are refused (non-finite floats travel as strings).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

from anyio import to_thread
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from ..errors import (
    VALIDATION_ERROR_CODE,
    GradwatchError,
    MalformedBodyError,
    PayloadTooLargeError,
    UnsupportedEncodingError,
)
from .deps import get_metrics, get_settings

__all__ = ["DecodedBodyRoute", "IngestRoute"]

_Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_GZIP = ("gzip", "x-gzip")
_IDENTITY = "identity"


class _DecodedRequest(Request):
    """A request whose body is read once, size-capped and gzip-decoded by :meth:`load`."""

    _decoded: bytes | None = None

    async def load(self, max_bytes: int) -> None:
        """Read, cap and decode the body.

        Raises:
            PayloadTooLargeError: More than ``max_bytes`` on the wire or after decoding.
            UnsupportedEncodingError: A ``Content-Encoding`` other than gzip or identity.
            MalformedBodyError: The gzip stream does not decode.
        """
        encoding = _content_encoding(self)
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise PayloadTooLargeError(
                f"body: {declared} bytes, at most {max_bytes} bytes accepted"
            )
        raw = bytearray()
        async for chunk in self.stream():
            raw += chunk
            if len(raw) > max_bytes:
                raise PayloadTooLargeError(
                    f"body: more than {max_bytes} bytes, at most {max_bytes} accepted"
                )
        if encoding == _IDENTITY:
            self._decoded = bytes(raw)
        else:
            self._decoded = await to_thread.run_sync(_gunzip, bytes(raw), max_bytes)

    async def body(self) -> bytes:
        """Return the decoded body (after :meth:`load`)."""
        if self._decoded is None:
            raise RuntimeError("body read before load()")
        return self._decoded

    async def json(self) -> Any:
        """Parse the decoded body as strict JSON, off the event loop."""
        return await to_thread.run_sync(_parse_json, await self.body())


def _content_encoding(request: Request) -> str:
    codings = [
        part.strip().lower()
        for header in request.headers.getlist("content-encoding")
        for part in header.split(",")
        if part.strip()
    ]
    codings = [coding for coding in codings if coding != _IDENTITY]
    if not codings:
        return _IDENTITY
    if len(codings) == 1 and codings[0] in _GZIP:
        return "gzip"
    raise UnsupportedEncodingError(
        f"Content-Encoding: {', '.join(codings)!s} not supported; send gzip or identity"
    )


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decode a (possibly multi-member) gzip stream, refusing more than ``max_bytes``."""
    out = bytearray()
    rest = data
    while True:
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += decoder.decompress(rest, max_bytes + 1 - len(out))
        except zlib.error as error:
            raise MalformedBodyError(f"body: not valid gzip ({error})") from error
        if len(out) > max_bytes:
            raise PayloadTooLargeError(
                f"body: more than {max_bytes} bytes after gzip decoding, at most {max_bytes} "
                "accepted"
            )
        if not decoder.eof:
            raise MalformedBodyError("body: gzip stream is truncated")
        rest = decoder.unused_data
        if not rest:
            return bytes(out)


def _refuse_constant(token: str) -> Any:
    raise json.JSONDecodeError(
        f"bare {token} is not JSON; send non-finite floats as the strings "
        '"NaN", "Infinity", "-Infinity"',
        token,
        0,
    )


def _parse_json(body: bytes) -> Any:
    return json.loads(body, parse_constant=_refuse_constant)


class DecodedBodyRoute(APIRoute):
    """An ``APIRoute`` that caps and gzip-decodes request bodies (``Settings.max_body_bytes``)."""

    def get_route_handler(self) -> _Handler:
        """Wrap FastAPI's handler so the body is decoded first."""
        handle = super().get_route_handler()

        async def handle_decoded(request: Request) -> Response:
            decoded = _DecodedRequest(request.scope, request.receive)
            await decoded.load(get_settings(request).max_body_bytes)
            return await handle(decoded)

        return handle_decoded


class IngestRoute(DecodedBodyRoute):
    """A :class:`DecodedBodyRoute` that also times requests and counts rejected batches."""

    def get_route_handler(self) -> _Handler:
        """Wrap the decoding handler with the ingest self-metrics."""
        handle = super().get_route_handler()

        async def handle_timed(request: Request) -> Response:
            metrics = get_metrics(request)
            started = time.perf_counter()
            try:
                return await handle(request)
            except RequestValidationError:
                metrics.record_rejection(VALIDATION_ERROR_CODE)
                raise
            except GradwatchError as error:
                metrics.record_rejection(error.code)
                raise
            finally:
                metrics.ingest_duration.observe(time.perf_counter() - started)

        return handle_timed
