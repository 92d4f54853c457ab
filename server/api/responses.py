"""The OpenAPI ``responses`` of every route: the one place error replies are documented.

Every error reply has the ``ErrorOut`` body (``api/errors.py`` builds them). Routes combine
the sets below; each status a route can answer is listed, with a description of when:

- :data:`READ`: routes that take a token and parameters (401, 403, 422, 429, 503);
- :data:`RUN_NOT_FOUND`: ``READ`` plus 404, for routes under ``/runs/{run_id}``;
- :data:`WRITE`: routes with a JSON body: ``READ`` plus 400, 413, 415.
"""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorOut

__all__ = ["AUTH", "READ", "RUN_NOT_FOUND", "WRITE", "Responses", "error"]

Responses = dict[int | str, dict[str, Any]]


def error(description: str) -> dict[str, Any]:
    """One documented error reply (an ``ErrorOut`` body) with this description."""
    return {"model": ErrorOut, "description": description}


AUTH: Responses = {
    401: error("A token is required, or it is not valid (code `unauthenticated`)."),
    403: error("The token lacks the scope or the project (code `forbidden`)."),
    429: error(
        "Rate limit: this token's requests, or this address's failed authentications; retry "
        "after Retry-After seconds (code `rate_limited`)."
    ),
}
"""Replies of every route that takes a token."""

READ: Responses = {
    **AUTH,
    422: error(
        "A parameter or field is invalid: code `invalid` lists them in `errors`; codes "
        "`invalid_query` and `invalid_batch` name the field that breaks a rule in `detail`."
    ),
    503: error("The database does not answer; retry after Retry-After seconds."),
}
"""Replies of every API route (token, parameters, database)."""

RUN_NOT_FOUND: Responses = {**READ, 404: error("No run has this id (code `run_not_found`).")}
"""Replies of every route under ``/runs/{run_id}``."""

WRITE: Responses = {
    **READ,
    400: error("The body does not decode: broken gzip (code `malformed_body`)."),
    413: error("The body is too large, on the wire or decoded (code `payload_too_large`)."),
    415: error(
        "Content-Type other than application/json (code `unsupported_media_type`), or "
        "Content-Encoding other than gzip/identity (code `unsupported_encoding`)."
    ),
}
"""Replies of every route that takes a JSON body."""
