"""The web UI on a server with tokens: nothing readable without a read token, all with one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer

from .conftest import watch
from .demo_runs import post_run

pytestmark = [pytest.mark.ui, pytest.mark.e2e]


def _token(database_url: str, scope: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch.server.cli", "token", "create", "--project", "demo",
         "--scope", scope, "--database-url", database_url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip()


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ui-auth') / 'gradwatch.db'}"
    with EmbeddedServer(Settings(database_url=url, require_auth=True)) as server:
        ingest, read = _token(url, "ingest"), _token(url, "read")
        headers = {"Authorization": f"Bearer {ingest}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30.0) as client:
            post_run(client, "demo-exploding", exploding=True)
        yield server.url, read


def test_ui_asks_for_a_read_token_and_shows_nothing_without_it(chromium, secured):
    base, read = secured
    ui = watch(chromium, base)
    try:
        page = ui.page
        page.goto(f"{base}/")
        dialog = page.locator("#token-dialog")
        dialog.wait_for(state="visible")
        assert page.locator("#runs-table tbody tr[data-run-id]").count() == 0
        ui.shot("auth-token-dialog")
        page.fill("#token-input", read)
        page.click("#token-submit")
        row = page.locator("#runs-table tbody tr[data-run-id]")
        row.first.wait_for()
        page.wait_for_selector(".verdict-critical")
        assert row.first.get_attribute("data-name") == "demo-exploding"
        assert page.evaluate("sessionStorage.getItem('gradwatch.token')") == read
        # The refused first request is the browser's only complaint.
        ui.console_errors = [e for e in ui.console_errors if "401" not in e]
        ui.check_clean()
    finally:
        ui.page.context.close()


def test_ui_rejects_a_wrong_token_and_asks_again(chromium, secured):
    base, _ = secured
    ui = watch(chromium, base)
    try:
        page = ui.page
        page.goto(f"{base}/")
        page.locator("#token-dialog").wait_for(state="visible")
        page.fill("#token-input", "gw_not_a_token")
        page.click("#token-submit")
        page.locator("#token-error").wait_for(state="visible")
        assert "refused" in page.locator("#token-error").inner_text()
        assert page.locator("#runs-table tbody tr[data-run-id]").count() == 0
    finally:
        ui.page.context.close()
