"""Domain errors, and the one place that maps them (and request validation) to HTTP.

Exception tree::

    GradwatchError
    ├── RunNotFoundError            404
    ├── LayerNotFoundError          404
    ├── BatchConflictError          409
    ├── InvalidBatchError           422
    ├── InvalidQueryError           422
    ├── PayloadTooLargeError        413
    ├── UnsupportedEncodingError    415
    ├── MalformedBodyError          400
    ├── AuthenticationError         401 (with ``WWW-Authenticate: Bearer``)
    ├── PermissionDeniedError       403
    └── RateLimitedError            429 (with ``Retry-After``)

Request validation errors (pydantic) become 422 with FastAPI's ``{"detail": [...]}`` shape,
minus the echoed input. Database outages (``OperationalError``, pool timeouts) become 503 with
``Retry-After`` so agents retry. Domain errors carry no HTTP knowledge; ``code`` is a stable
machine-readable slug (also the ``reason`` label of ``gradwatch_ingest_rejected_total``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

__all__ = [
    "MAX_REPORTED_VALIDATION_ERRORS",
    "VALIDATION_ERROR_CODE",
    "AuthenticationError",
    "BatchConflictError",
    "GradwatchError",
    "InvalidBatchError",
    "InvalidQueryError",
    "LayerNotFoundError",
    "MalformedBodyError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RunNotFoundError",
    "UnsupportedEncodingError",
    "install_error_handlers",
]

MAX_REPORTED_VALIDATION_ERRORS = 20
"""A 422 lists at most this many validation errors (a bad batch can have millions)."""

VALIDATION_ERROR_CODE = "invalid"
"""``code`` of request validation failures."""

_RETRY_AFTER_SECONDS = 1


class GradwatchError(Exception):
    """Base of the server's domain errors.

    Attributes:
        message: Human-readable explanation naming the offending field or object.
    """

    code: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RunNotFoundError(GradwatchError):
    """No run has this id."""

    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} not found (create it with POST /api/v1/runs)")
        self.run_id = run_id


class LayerNotFoundError(GradwatchError):
    """The run has no layer with this name."""

    code = "layer_not_found"

    def __init__(self, run_id: str, layer: str) -> None:
        super().__init__(f"run {run_id} has no layer {layer!r}")
        self.run_id = run_id
        self.layer = layer


class BatchConflictError(GradwatchError):
    """A batch overlaps stored steps without being a resend of them, or reuses a batch id."""

    code = "batch_conflict"


class InvalidBatchError(GradwatchError):
    """A batch is well-formed but breaks a server limit or rule."""

    code = "invalid_batch"


class InvalidQueryError(GradwatchError):
    """Query parameters are inconsistent (e.g. ``layer`` missing for a per-layer metric)."""

    code = "invalid_query"


class PayloadTooLargeError(GradwatchError):
    """The request body, on the wire or decoded, is larger than allowed."""

    code = "payload_too_large"


class UnsupportedEncodingError(GradwatchError):
    """The request body uses a ``Content-Encoding`` other than gzip or identity."""

    code = "unsupported_encoding"


class MalformedBodyError(GradwatchError):
    """The request body cannot be decoded (e.g. broken gzip)."""

    code = "malformed_body"


class AuthenticationError(GradwatchError):
    """No token where one is required, or a token that is unknown, malformed or revoked."""

    code = "unauthenticated"


class PermissionDeniedError(GradwatchError):
    """A valid token without the scope, or for another project."""

    code = "forbidden"


class RateLimitedError(GradwatchError):
    """The token sent more requests than its rate limit allows.

    Attributes:
        retry_after_seconds: Whole seconds until the next request will be accepted (≥ 1).
    """

    code = "rate_limited"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


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
