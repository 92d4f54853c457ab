"""``gradwatch open RUN``: print the run's page in the web UI and open it in a browser."""

from __future__ import annotations

import os
import sys
import webbrowser
from typing import Annotated

import typer

from .client import (
    DEFAULT_SERVER,
    ApiClient,
    RunArgument,
    ServerOption,
    TimeoutOption,
    TokenOption,
)
from .exits import report_errors

__all__ = ["open_run"]


def open_run(
    run: RunArgument,
    browser: Annotated[
        bool,
        typer.Option(
            "--browser/--no-browser",
            help="Open the page in the default browser where one exists.",
        ),
    ] = True,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Print the URL of a run's page ({server}/runs/{run_id}) and open it in a browser.

    The URL goes to stdout whether or not a browser opens it. A browser is tried only where
    one can show a page (macOS, Windows, a graphical session, or $BROWSER set), so a text
    browser never takes over an SSH terminal; none is not an error.
    """
    with report_errors("open"), ApiClient(server, token, timeout) as client:
        url = client.run_url(str(client.resolve_run(run)["run_id"]))
    typer.echo(url)
    if browser and not _open_in_browser(url):
        typer.echo("no browser found here: open the URL above yourself", err=True)


def _open_in_browser(url: str) -> bool:
    graphical = sys.platform in ("darwin", "win32") or any(
        os.environ.get(name) for name in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY")
    )
    if not graphical:
        return False
    try:
        return webbrowser.open(url, new=2)
    except webbrowser.Error:
        return False
