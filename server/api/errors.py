"""The one place that maps errors to HTTP replies, all with one body shape (``ErrorOut``).

Every error reply is ``{"code": <slug>, "detail": <text>}``; request validation errors (422)
add ``errors`` (at most :data:`MAX_REPORTED_VALIDATION_ERRORS` of ``{type, loc, msg}``, the
echoed input dropped) and ``error_count``. Sources:

- domain errors (:mod:`gradwatch.server.errors`): their status and ``code``;
- request validation (pydantic, and the strict JSON parser): 422, ``code`` ``invalid``;
- HTTP errors raised by Starlette or FastAPI (unknown path 404, wrong method 405 with an
  ``Allow`` header listing every method of the path): their status, ``code`` from it;
- database outages (``OperationalError``, pool timeouts): 503 with ``Retry-After`` so agents
  retry;
- anything else: 500 ``internal_error`` (a bug; never with a traceback).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import (
    VALIDATION_ERROR_CODE,
    AuthenticationError,
    BatchConflictError,
    GradwatchError,
    InvalidBatchError,
    InvalidQueryError,
    LayerNotFoundError,
    MalformedBodyError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    RunNotFoundError,
    UnsupportedEncodingError,
    UnsupportedMediaTypeError,
)

__all__ = ["MAX_REPORTED_VALIDATION_ERRORS", "STATUS_CODES", "install_error_handlers"]

MAX_REPORTED_VALIDATION_ERRORS = 20
"""A 422 lists at most this many validation errors (a bad batch can have millions)."""

_RETRY_AFTER_SECONDS = 1
_log = logging.getLogger(__name__)

_STATUS: dict[type[GradwatchError], int] = {
    RunNotFoundError: 404,
    LayerNotFoundError: 404,
    BatchConflictError: 409,
    InvalidBatchError: 422,
    InvalidQueryError: 422,
    PayloadTooLargeError: 413,
    UnsupportedEncodingError: 415,
    UnsupportedMediaTypeError: 415,
    MalformedBodyError: 400,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    RateLimitedError: 429,
}

STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: AuthenticationError.code,
    403: PermissionDeniedError.code,
    404: "not_found",
    405: "method_not_allowed",
    413: PayloadTooLargeError.code,
    415: UnsupportedMediaTypeError.code,
    422: VALIDATION_ERROR_CODE,
    429: RateLimitedError.code,
    500: "internal_error",
    503: "database_unavailable",
}
"""``code`` of the replies of a status when no domain error gives one (Starlette's 404, 405)."""


def _status_of(error: GradwatchError) -> int:
    """Return the HTTP status a domain error maps to."""
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return 400


def _reply(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"code": code, "detail": detail, **extra}, headers=headers
    )


def _handle_domain_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, GradwatchError)
    headers: dict[str, str] = {}
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, RateLimitedError):
        headers["Retry-After"] = str(error.retry_after_seconds)
    return _reply(_status_of(error), error.code, error.message, headers or None)


def _handle_validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = [_describe(item) for item in error.errors()]
    first = errors[0] if errors else {"type": "", "loc": ["body"], "msg": "invalid request"}
    # "body.grad_norm" reads "grad_norm"; a JSON syntax error's loc holds a character offset.
    named = first["loc"][:1] if str(first["type"]).startswith("json") else first["loc"][1:]
    where = ".".join(str(part) for part in named or first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _reply(
        422,
        VALIDATION_ERROR_CODE,
        f"{where}: {first['msg']}{more}",
        errors=errors[:MAX_REPORTED_VALIDATION_ERRORS],
        error_count=len(errors),
    )


def _describe(item: Any) -> dict[str, Any]:
    """Keep type, loc and msg of a validation error; drop the echoed input (maybe huge)."""
    message = str(item.get("msg", ""))
    context = item.get("ctx") or {}
    if item.get("type") == "json_invalid" and isinstance(context.get("error"), str):
        message = f"{message}: {context['error']}"
    return {
        "type": str(item.get("type", "")),
        "loc": [part if isinstance(part, int) else str(part) for part in item.get("loc", ())],
        "msg": message,
    }


def _handle_http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    status = error.status_code
    headers = dict(error.headers or {})
    if status == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    detail = error.detail if isinstance(error.detail, str) else phrase
    return _reply(status, STATUS_CODES.get(status, f"http_{status}"), detail, headers or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (the router names only the
    first route's), found by asking each route whether it would take the path with it."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]


def _handle_database_unavailable(_request: Request, _error: Exception) -> JSONResponse:
    return _reply(
        503,
        "database_unavailable",
        "database unavailable, retry later",
        {"Retry-After": str(_RETRY_AFTER_SECONDS)},
    )


def _handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    _log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return _reply(500, "internal_error", "internal server error (a bug; see the server log)")


def install_error_handlers(app: FastAPI) -> None:
    """Install the exception handlers that turn errors into HTTP replies. Not thread-safe."""
    app.add_exception_handler(GradwatchError, _handle_domain_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_exception_handler(OperationalError, _handle_database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _handle_database_unavailable)
    app.add_exception_handler(Exception, _handle_unexpected)
