"""Domain errors of the server; ``api/errors.py`` is the one place that maps them to HTTP.

Exception tree::

    GradwatchError
    ├── RunNotFoundError            404
    ├── LayerNotFoundError          404
    ├── BatchConflictError          409
    ├── InvalidBatchError           422
    ├── InvalidQueryError           422
    ├── PayloadTooLargeError        413
    ├── UnsupportedEncodingError    415
    ├── UnsupportedMediaTypeError   415
    ├── MalformedBodyError          400
    ├── AuthenticationError         401 (with ``WWW-Authenticate: Bearer``)
    ├── PermissionDeniedError       403
    └── RateLimitedError            429 (with ``Retry-After``)

(The statuses are those :mod:`gradwatch.server.api.errors` gives them.) Domain errors carry no
HTTP knowledge; ``code`` is a stable machine-readable slug (also the ``reason`` label of
``gradwatch_ingest_rejected_total``).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
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
    "UnsupportedMediaTypeError",
]

VALIDATION_ERROR_CODE = "invalid"
"""``code`` of request validation failures."""


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


class UnsupportedMediaTypeError(GradwatchError):
    """The request body is not declared ``Content-Type: application/json``."""

    code = "unsupported_media_type"


class MalformedBodyError(GradwatchError):
    """The request body cannot be decoded (broken gzip)."""

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
