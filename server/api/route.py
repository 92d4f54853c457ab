"""Route classes that check the caller, then read, decode and parse request bodies.

:class:`DecodedBodyRoute` handles a route's body itself before FastAPI sees it (the FastAPI
"custom request and APIRoute class" pattern), in an order where nothing costly happens for a
caller who may not send it:

1. the route's access dependency (:class:`~gradwatch.server.api.deps.Access`: token, scope,
   project of the path's run) runs first, so an unauthenticated body is answered 401 without
   being read, decompressed or parsed (and failed tokens are rate-limited per address);
2. the body's media type (415) and encoding (415) are checked from the headers;
3. the body is read and gzip-decoded under ``Settings.max_body_bytes`` (413, 400);
4. it is parsed as strict JSON (422; see :mod:`gradwatch.server.api.body`), or on
   :class:`IngestRoute` as the binary batch body when sent as one
   (:mod:`gradwatch.server.api.binary_batch`).

Endpoints still declare pydantic bodies, which appear in OpenAPI; FastAPI then validates the
parsed value. The batch endpoint takes either body, so it reads it through
:func:`batch_body` instead (and declares both media types in OpenAPI). Routes without a body
are left to FastAPI (their access dependency runs as usual, and nothing reads a body).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from anyio import to_thread
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError

from gradwatch.wire.binary import MEDIA_TYPE

from ..errors import VALIDATION_ERROR_CODE, GradwatchError
from ..ingest.columns import BatchColumns, from_json
from ..schemas import StepBatch
from .binary_batch import parse_binary_batch
from .body import check_media_type, content_encoding, decode_body, parse_json, read_body
from .deps import Access, check_access, get_metrics, get_settings

__all__ = ["DecodedBodyRoute", "IngestRoute", "batch_body"]

_Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_NOTHING = object()


class _DecodedRequest(Request):
    """A request whose body was read, decoded and parsed by :class:`DecodedBodyRoute`."""

    _decoded: bytes = b""
    _parsed: Any = _NOTHING
    _binary: bool = False

    async def body(self) -> bytes:
        """Return the decoded body."""
        return self._decoded

    async def json(self) -> Any:
        """Return the parsed body (parsed once, off the event loop)."""
        if self._parsed is _NOTHING:
            parse = parse_binary_batch if self._binary else parse_json
            self._parsed = await to_thread.run_sync(parse, self._decoded)
        return self._parsed


def _find_access(dependant: Dependant) -> Access | None:
    """The route's access dependency, searched depth-first."""
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, Access):
            return dependency.call
        found = _find_access(dependency)
        if found is not None:
            return found
    return None


def _declares_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in request.headers


class DecodedBodyRoute(APIRoute):
    """An ``APIRoute`` that authenticates, then caps, decodes and parses request bodies."""

    binary_media_type: str | None = None
    """A binary media type the route takes besides JSON (its endpoint reads the body with
    :func:`batch_body`), or None."""

    def get_route_handler(self) -> _Handler:
        """Wrap FastAPI's handler so the caller is checked and the body decoded first."""
        handle = super().get_route_handler()
        takes_binary = self.binary_media_type is not None and "POST" in (self.methods or ())
        if self.body_field is None and not takes_binary:
            return handle
        access = _find_access(self.dependant)

        async def handle_decoded(request: Request) -> Response:
            if access is not None:
                await to_thread.run_sync(check_access, request, access)
            decoded = _DecodedRequest(request.scope, request.receive)
            if _declares_body(request):
                decoded._binary = check_media_type(request, self.binary_media_type)
                encoding = content_encoding(request)
                max_bytes = get_settings(request).max_body_bytes
                metrics = get_metrics(request)
                raw = await read_body(request, max_bytes)
                metrics.body_read_bytes.inc(len(raw))
                if encoding != "identity":
                    decoded._decoded = await to_thread.run_sync(
                        decode_body, raw, encoding, max_bytes
                    )
                    metrics.body_decoded_bytes.inc(len(decoded._decoded))
                else:
                    decoded._decoded = raw
                if decoded._decoded:
                    await decoded.json()
            return await handle(decoded)

        return handle_decoded


class IngestRoute(DecodedBodyRoute):
    """A :class:`DecodedBodyRoute` that takes binary batches too, times requests and counts
    rejected batches."""

    binary_media_type = MEDIA_TYPE

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


def batch_body(request: Request) -> BatchColumns:
    """The batch an :class:`IngestRoute` request carries, JSON or binary, validated.

    A FastAPI dependency: a JSON body is validated as
    :class:`~gradwatch.server.schemas.StepBatch`, with the errors FastAPI would give (``loc``
    under ``body``). Blocks for CPU time (FastAPI runs it in a worker thread).

    Raises:
        RequestValidationError: No body, or a JSON body that is not a valid batch (422).
    """
    parsed = request._parsed if isinstance(request, _DecodedRequest) else _NOTHING
    if isinstance(parsed, BatchColumns):
        return parsed
    if parsed is _NOTHING:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        return from_json(StepBatch.model_validate(parsed))
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
        ) from None
