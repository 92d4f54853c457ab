"""Open a study's report.html in Debian's headless Chromium (Playwright, ``executable_path``).

Used by the tests and, as ``python -m tests.study.browser REPORT PNG``, to take the README's
screenshot of the report's curves (``--section`` picks which, default the SGD rows).
The page may load nothing but itself (and ``data:`` URLs): any other request is aborted and
recorded. ``playwright install`` is never used.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS


@dataclass
class OpenedReport:
    """The report's page, with its console errors and the requests it tried elsewhere."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


@contextmanager
def open_report(path: Path, width: int = 1150) -> Iterator[OpenedReport]:
    """Open ``path`` in headless Chromium; blocks until the page has loaded."""
    from playwright.sync_api import sync_playwright

    url = path.resolve().as_uri()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            opened = OpenedReport(page)
            page.on(
                "console",
                lambda m: opened.console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda error: opened.console_errors.append(str(error)))

            def guard(route: Any) -> None:
                if route.request.url in (url,) or route.request.url.startswith("data:"):
                    route.continue_()
                else:
                    opened.blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", guard)
            page.goto(url, wait_until="load")
            yield opened
        finally:
            browser.close()


def screenshot(report: Path, png: Path, sections: list[str]) -> None:
    """Save the report's curve sections ``sections`` (ids) as one PNG; blocks."""
    with open_report(report) as opened:
        page = opened.page
        page.evaluate(
            """(keep) => {
                for (const s of document.querySelectorAll("section.curves"))
                    if (!keep.includes(s.id)) s.remove();
                for (const h of document.querySelectorAll("h2"))
                    if (h.textContent !== "Curves") h.style.display = "none";
                for (const el of document.body.children)
                    if (!["H2", "SECTION", "P"].includes(el.tagName) || el.id === "summary")
                        el.style.display = "none";
                for (const p of document.querySelectorAll("body > p:not(.legend)"))
                    p.style.display = "none";
            }""",
            sections,
        )
        page.set_viewport_size({"width": 1040, "height": 200})  # full_page: the content's height
        page.screenshot(path=str(png), full_page=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument(
        "--section",
        action="append",
        help="id of a curves section (curves-OPTIMIZER-RATE); repeatable",
    )
    args = parser.parse_args()
    screenshot(args.report, args.png, args.section or ["curves-sgd-low", "curves-sgd-high"])


if __name__ == "__main__":
    main()
