"""The one place that maps errors to HTTP replies.

Domain errors (:mod:`gradwatch.server.errors`) become their status with ``{"detail", "code"}``.
Request validation errors (pydantic) become 422 with FastAPI's ``{"detail": [...]}`` shape,
minus the echoed input. Database outages (``OperationalError``, pool timeouts) become 503 with
``Retry-After`` so agents retry.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

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
)

__all__ = ["MAX_REPORTED_VALIDATION_ERRORS", "install_error_handlers"]

MAX_REPORTED_VALIDATION_ERRORS = 20
"""A 422 lists at most this many validation errors (a bad batch can have millions)."""

_RETRY_AFTER_SECONDS = 1

_STATUS: dict[type[GradwatchError], int] = {
    RunNotFoundError: 404,
    LayerNotFoundError: 404,
    BatchConflictError: 409,
    InvalidBatchError: 422,
    InvalidQueryError: 422,
    PayloadTooLargeError: 413,
    UnsupportedEncodingError: 415,
    MalformedBodyError: 400,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    RateLimitedError: 429,
}


def _status_of(error: GradwatchError) -> int:
    """Return the HTTP status a domain error maps to."""
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return 400


def _handle_domain_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, GradwatchError)
    headers: dict[str, str] = {}
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, RateLimitedError):
        headers["Retry-After"] = str(error.retry_after_seconds)
    return JSONResponse(
        status_code=_status_of(error),
        content={"detail": error.message, "code": error.code},
        headers=headers or None,
    )


def _handle_validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = error.errors()
    return JSONResponse(
        status_code=422,
        content={
            "detail": [_describe(item) for item in errors[:MAX_REPORTED_VALIDATION_ERRORS]],
            "code": VALIDATION_ERROR_CODE,
            "error_count": len(errors),
        },
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


def _handle_database_unavailable(_request: Request, _error: Exception) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"detail": "database unavailable, retry later", "code": "database_unavailable"},
        headers={"Retry-After": str(_RETRY_AFTER_SECONDS)},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Install the exception handlers that turn errors into HTTP replies. Not thread-safe."""
    app.add_exception_handler(GradwatchError, _handle_domain_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(OperationalError, _handle_database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _handle_database_unavailable)
