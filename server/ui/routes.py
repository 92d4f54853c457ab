"""Serve the web UI (one static page, package data) and the API docs with local assets.

The page URLs are part of the product's contract (the CLI and alert annotations link to
them): ``/`` (runs list), ``/runs/{run_id}`` (a run; query ``layer``, ``from``, ``to``,
``log``) and ``/compare?runs=<id>,<id>,…``. Each answers the same ``index.html``; the page's
JavaScript reads the URL and fetches its data from ``/api/v1`` only. The page itself holds no
data, so it is served without a token; the API calls it makes need one when the server
has tokens. ``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript and CSS from
``/static/vendor`` (see ``static/vendor/VENDORED.md``), never from a CDN.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "install_ui"]

STATIC_DIR = Path(str(files("gradwatch.server.ui") / "static"))
"""The UI's files (package data)."""

_VENDOR = "/static/vendor"
_NO_STORE = {"Cache-Control": "no-cache"}


def install_ui(app: FastAPI) -> None:
    """Mount the static files and add the page and docs routes to ``app`` (not in OpenAPI).

    The app must be built with ``docs_url=None`` and ``redoc_url=None``: these routes replace
    FastAPI's CDN-loading ones.
    """
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(_pages(app.title, app.openapi_url or "/openapi.json"))


def _pages(title: str, openapi_url: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    index = STATIC_DIR / "index.html"

    @router.get("/")
    def runs_page() -> FileResponse:
        """The runs list."""
        return FileResponse(index, headers=_NO_STORE)

    @router.get("/runs/{run_id}")
    def run_page(run_id: str) -> FileResponse:
        """One run: charts, heatmap, layers, events."""
        return FileResponse(index, headers=_NO_STORE)

    @router.get("/compare")
    def compare_page() -> FileResponse:
        """Several runs overlaid."""
        return FileResponse(index, headers=_NO_STORE)

    @router.get("/docs")
    def swagger_ui() -> HTMLResponse:
        """Swagger UI with local assets."""
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} API",
            swagger_js_url=f"{_VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{_VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{_VENDOR}/swagger-ui/favicon-32x32.png",
        )

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        """ReDoc with local assets and no web fonts.

        ReDoc 2 shows a logo from ``cdn.redoc.ly`` in its sidebar; the page's content security
        policy keeps images local, so the browser never asks for it (the logo is left out).
        """
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} API",
            redoc_js_url=f"{_VENDOR}/redoc/redoc.standalone.js",
            redoc_favicon_url="/static/favicon.svg",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = "img-src 'self' data:"
        return page

    return router
