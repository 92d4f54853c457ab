"""One real server holding the demo's two runs and one headless Chromium per test module.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright through
``executable_path`` (``playwright install`` is never used: it downloads browsers). Without it
the tests skip, unless ``GRADWATCH_REQUIRE_CHROMIUM=1`` (set by ``.ci/run``) turns that into a
failure. Every page records console errors and aborts any request that is not for the test
server on 127.0.0.1; each test checks both. Screenshots go to ``$GRADWATCH_ARTIFACTS/ui`` or
``tests/ui/artifacts`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer

from .demo_runs import DemoRun, post_run

CHROMIUM = os.environ.get("GRADWATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
INSTALL = "apt-get install -y chromium && pip install playwright"


def chromium_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"playwright is not installed ({INSTALL})"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} ({INSTALL})"
    return None


def artifacts_dir() -> Path:
    """Where screenshots go."""
    root = os.environ.get("GRADWATCH_ARTIFACTS")
    path = Path(root) / "ui" if root else Path(__file__).parent / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Demo:
    """The server and its two runs."""

    url: str
    stable: DemoRun
    exploding: DemoRun


@dataclass
class Watched:
    """A page with what it logged and what it tried to fetch elsewhere."""

    page: Any
    base: str
    console_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def check_clean(self) -> None:
        assert self.blocked == [], f"requests left 127.0.0.1: {self.blocked}"
        assert self.console_errors == [], self.console_errors

    def shot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    missing = chromium_missing()
    if missing:
        if os.environ.get("GRADWATCH_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"GRADWATCH_REQUIRE_CHROMIUM=1 but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    database = tmp_path_factory.mktemp("ui") / "gradwatch.db"
    with EmbeddedServer(Settings(database_url=f"sqlite:///{database}")) as server:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            stable = post_run(client, "demo-stable", exploding=False)
            exploding = post_run(client, "demo-exploding", exploding=True)
        yield Demo(server.url, stable, exploding)


def watch(browser: Any, base: str, **context_args: Any) -> Watched:
    """A fresh context and page on ``base``, with console and network guards."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, **context_args)
    page = context.new_page()
    watched = Watched(page, base)
    page.on(
        "console",
        lambda message: (
            watched.console_errors.append(message.text) if message.type == "error" else None
        ),
    )
    page.on("pageerror", lambda error: watched.console_errors.append(str(error)))

    def guard(route: Any) -> None:
        url = route.request.url
        if url.startswith(f"{base}/") or url == base or url.startswith("data:"):
            route.continue_()
        else:
            watched.blocked.append(url)
            route.abort()

    context.route("**/*", guard)
    return watched


@pytest.fixture
def ui(chromium, demo) -> Iterator[Watched]:
    watched = watch(chromium, demo.url)
    yield watched
    watched.page.context.close()
