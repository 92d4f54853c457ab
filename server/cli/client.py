"""The HTTP client of the read commands (``runs``, ``show``, ``check``, ``open``).

These commands talk to a gradwatch server over its REST API only: they import no store, no
SQLAlchemy and no server framework, so they work from any machine that can reach the server.
Every failure a user can cause or meet becomes a :class:`~.exits.CliError` with a one-line
message and the exit code of DESIGN §10 (:class:`~.exits.ExitCode`);
:func:`~.exits.report_errors` prints it.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import httpx
import typer

from .exits import CliError, ExitCode

__all__ = [
    "DEFAULT_SERVER",
    "ApiClient",
    "RunArgument",
    "ServerOption",
    "TimeoutOption",
    "TokenOption",
    "check_server_url",
]

DEFAULT_SERVER = "http://127.0.0.1:8000"
"""Where ``gradwatch server`` listens by default."""

_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I)
_ID_PREFIX = re.compile(r"^[0-9a-fA-F-]{4,35}$")
_PAGE = 500
"""Largest page of ``GET /api/v1/runs``."""
_PREFIX_SCAN_PAGES = 20
"""At most this many pages (10,000 runs) are scanned to resolve a run-id prefix."""
_RETRIES = 3
"""Retries of a request answered 429 or 503 (``Retry-After`` honoured, capped)."""
_MAX_RETRY_WAIT_SECONDS = 2.0


RunArgument = Annotated[
    str,
    typer.Argument(
        metavar="RUN",
        help="Run id, a unique prefix of it, or the run's name.",
        show_default=False,
    ),
]
ServerOption = Annotated[
    str,
    typer.Option(
        "--server",
        envvar="GRADWATCH_SERVER",
        metavar="URL",
        help="Base URL of the gradwatch server.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="GRADWATCH_TOKEN",
        metavar="TOKEN",
        help="API token with the read scope, once the server has tokens.",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, metavar="SECONDS", help="Timeout of one request."),
]


def check_server_url(url: str) -> str:
    """Return ``url`` without a trailing slash, or raise :class:`CliError` (usage) if bad."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as error:
        raise CliError(f"--server {url!r} is not a URL ({error})", ExitCode.USAGE) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CliError(
            f"--server {url!r} is not an http(s)://host[:port] URL (e.g. {DEFAULT_SERVER})",
            ExitCode.USAGE,
        )
    return str(parsed).rstrip("/")


class ApiClient:
    """A gradwatch server's REST API, with every error mapped to a :class:`CliError`.

    Args:
        server: Base URL (``http(s)://host[:port][/path]``).
        token: Bearer token, or None for a server without tokens.
        timeout_seconds: Timeout of one request (connect, read, write).

    Not thread-safe; close it (or use it as a context manager) when done.
    """

    def __init__(self, server: str, token: str | None, timeout_seconds: float = 10.0) -> None:
        self.server = check_server_url(server)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token.strip()}"
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_seconds)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def run_url(self, run_id: str) -> str:
        """The run's page in the web UI."""
        return f"{self.server}/runs/{run_id}"

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET ``path`` and return its decoded JSON (non-finite floats stay strings).

        Raises:
            CliError: unreachable (3), refused token or not found (2), or a bad reply.
        """
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in range(_RETRIES + 1):
            try:
                response = self._http.get(path, params=clean)
            except httpx.TransportError as error:
                raise CliError(
                    f"cannot reach the gradwatch server at {self.server}: {_describe(error)}",
                    ExitCode.UNREACHABLE,
                ) from None
            if response.status_code in (429, 503) and attempt < _RETRIES:
                time.sleep(_retry_after(response))
                continue
            break
        if response.status_code >= 400:
            raise self._error(response)
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"{self.server}{path} did not answer JSON: is it a gradwatch server?",
                ExitCode.USAGE,
            ) from None

    def list_runs(
        self,
        *,
        project: str | None = None,
        status: str | None = None,
        name: str | None = None,
        limit: int = 20,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` runs, newest first (paged by the server's cursor)."""
        runs: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(runs) < limit:
            page = self.get(
                "/api/v1/runs",
                {
                    "project": project,
                    "status": status,
                    "name": name,
                    "cursor": cursor,
                    "limit": min(_PAGE, limit - len(runs)),
                },
            )
            runs.extend(page["runs"])
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        return runs[:limit]

    def run(self, run_id: str) -> dict[str, Any]:
        """One run with its totals (``GET /api/v1/runs/{run_id}``)."""
        result: dict[str, Any] = self.get(f"/api/v1/runs/{run_id}")
        return result

    def health(self, run_id: str, recent_steps: int = 1000, worst: int = 5) -> dict[str, Any]:
        """The run's health summary (``GET …/health``)."""
        result: dict[str, Any] = self.get(
            f"/api/v1/runs/{run_id}/health", {"recent_steps": recent_steps, "worst": worst}
        )
        return result

    def events(self, run_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """The run's newest events."""
        page = self.get(f"/api/v1/runs/{run_id}/events", {"limit": limit})
        events: list[dict[str, Any]] = page["events"]
        return events

    def series(self, run_id: str, metric: str, max_points: int) -> dict[str, Any]:
        """A run-level series, raw or bucketed to at most ``max_points`` buckets."""
        result: dict[str, Any] = self.get(
            f"/api/v1/runs/{run_id}/series", {"metric": metric, "max_points": max_points}
        )
        return result

    def resolve_run(self, ref: str) -> dict[str, Any]:
        """The run that ``ref`` names: its id, a unique id prefix, or its exact name.

        Raises:
            CliError: (usage) no run matches, or several do (each is listed).
        """
        ref = ref.strip()
        if _UUID.match(ref):
            return self.run(ref)
        named = [r for r in self.list_runs(name=ref, limit=_PAGE) if r["name"] == ref]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise _ambiguous(ref, "runs are named", named)
        if _ID_PREFIX.match(ref):
            matches = self._runs_with_id_prefix(ref.lower())
            if len(matches) == 1:
                return self.run(matches[0]["run_id"])
            if len(matches) > 1:
                raise _ambiguous(ref, "run ids start with", matches)
        raise CliError(
            f"no run {ref!r} on {self.server} (give a run id, a unique id prefix or a run name; "
            "see gradwatch runs)",
            ExitCode.USAGE,
        )

    def _runs_with_id_prefix(self, prefix: str) -> list[dict[str, Any]]:
        matches: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(_PREFIX_SCAN_PAGES):
            page = self.get("/api/v1/runs", {"cursor": cursor, "limit": _PAGE})
            matches.extend(r for r in page["runs"] if str(r["run_id"]).startswith(prefix))
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        return matches

    def _error(self, response: httpx.Response) -> CliError:
        detail, code = _detail(response)
        status = response.status_code
        if status == 401:
            return CliError(
                f"the server at {self.server} needs a valid token (401: {detail}); pass --token "
                "or set GRADWATCH_TOKEN to a token with the read scope",
                ExitCode.USAGE,
            )
        if status == 403:
            return CliError(
                f"the token may not read this (403: {detail}); it needs the read scope of the "
                "run's project",
                ExitCode.USAGE,
            )
        if status == 404:
            if code == "run_not_found":
                run_id = response.request.url.path.split("/")[4]
                return CliError(f"no run {run_id} on {self.server}", ExitCode.USAGE)
            return CliError(
                f"{response.request.url.path} not found on {self.server} (404: {detail}): "
                "is it a gradwatch server?",
                ExitCode.USAGE,
            )
        if status >= 500:
            return CliError(
                f"the gradwatch server at {self.server} failed ({status}: {detail})",
                ExitCode.UNREACHABLE,
            )
        return CliError(f"the server answered {status}: {detail}", ExitCode.USAGE)


def _describe(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.TimeoutException):
        return "timed out"
    text = str(error) or type(error).__name__
    return text.splitlines()[0]


def _detail(response: httpx.Response) -> tuple[str, str | None]:
    """The error reply's ``detail`` (or the reason phrase) and its ``code``."""
    reason = response.reason_phrase or "no details"
    try:
        body = response.json()
    except ValueError:
        return reason, None
    if not isinstance(body, dict):
        return reason, None
    detail = body.get("detail")
    code = body.get("code")
    return (
        detail if isinstance(detail, str) else reason,
        code if isinstance(code, str) else None,
    )


def _retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), _MAX_RETRY_WAIT_SECONDS)


def _ambiguous(ref: str, what: str, runs: list[dict[str, Any]]) -> CliError:
    listed = ", ".join(f"{r['run_id']} ({r['name']}, {r['project']})" for r in runs[:5])
    more = f" and {len(runs) - 5} more" if len(runs) > 5 else ""
    return CliError(
        f"{ref!r} is ambiguous: {len(runs)} {what} it: {listed}{more}; pass the run id",
        ExitCode.USAGE,
    )
