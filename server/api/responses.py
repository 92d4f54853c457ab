"""The OpenAPI ``responses`` the routers share: error replies of authenticated routes."""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorOut

__all__ = ["AUTH", "RUN_NOT_FOUND", "Responses", "error"]

Responses = dict[int | str, dict[str, Any]]


def error(description: str) -> dict[str, Any]:
    """One documented error reply (an ``ErrorOut`` body) with this description."""
    return {"model": ErrorOut, "description": description}


AUTH: Responses = {
    401: error("A token is required, or it is not valid."),
    403: error("The token lacks the scope or the project."),
    429: error("Rate limit; retry after Retry-After seconds."),
}
"""Replies of every route that takes a token."""

RUN_NOT_FOUND: Responses = {**AUTH, 404: error("No run has this id.")}
"""Replies of every route under ``/runs/{run_id}``."""
