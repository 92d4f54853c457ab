"""The web UI in real headless Chromium against a real server holding the demo's two runs."""

from __future__ import annotations

import re

import pytest

from .demo_runs import EXPLODING_LAYER

pytestmark = [pytest.mark.ui, pytest.mark.e2e]

TIMEOUT_MS = 20_000


def _open_run(ui, run_id: str, query: str = "") -> None:
    ui.page.goto(f"{ui.base}/runs/{run_id}{query}")
    ui.page.wait_for_selector(
        "body[data-run-ready='1'][data-heatmap-ready='1']", timeout=TIMEOUT_MS
    )


def test_runs_list_shows_both_runs_with_their_verdicts(ui, demo):
    ui.page.goto(f"{ui.base}/")
    rows = ui.page.locator("#runs-table tbody tr[data-run-id]")
    rows.first.wait_for(timeout=TIMEOUT_MS)
    ui.page.wait_for_selector(".verdict:not(.verdict-unknown)", timeout=TIMEOUT_MS)
    assert rows.count() == 2
    # Newest first: the exploding run was posted second.
    assert rows.nth(0).get_attribute("data-name") == "demo-exploding"
    verdicts = {
        rows.nth(i).get_attribute("data-name"): rows.nth(i).locator(".verdict").inner_text()
        for i in range(2)
    }
    assert verdicts == {"demo-stable": "healthy", "demo-exploding": "critical"}
    assert "verdict-critical" in rows.nth(0).locator(".verdict").get_attribute("class")
    ui.shot("runs")
    ui.page.fill("input[name=name]", "stable")
    ui.page.click("#run-filters button[type=submit]")
    ui.page.wait_for_url(re.compile(r"name=stable"))
    ui.page.wait_for_function(
        "document.querySelectorAll('#runs-table tbody tr[data-run-id]').length === 1"
    )
    assert rows.nth(0).get_attribute("data-name") == "demo-stable"
    ui.check_clean()


def test_run_page_draws_charts_heatmap_and_marks_the_exploding_layer(ui, demo):
    _open_run(ui, demo.exploding.run_id)
    page = ui.page
    assert page.locator("#norm-chart").get_attribute("data-series-count") == "3"
    assert page.locator("#loss-chart").get_attribute("data-series-count") == "1"
    assert int(page.locator("#norm-chart").get_attribute("data-points")) > 100
    # The canvases hold drawn pixels, not a blank surface.
    for selector in ("#norm-chart canvas", "#loss-chart canvas", "canvas#heatmap"):
        assert page.eval_on_selector(selector, _INKED_PIXELS) > 500, selector
    heatmap = page.locator("canvas#heatmap")
    assert heatmap.get_attribute("data-first-layer") == EXPLODING_LAYER
    assert heatmap.get_attribute("data-hottest-layer") == EXPLODING_LAYER
    assert heatmap.get_attribute("data-rows") == "3"
    # The layer table puts the exploding layers first; the verdict is critical.
    assert page.locator("h1 .verdict").inner_text() == "critical"
    first = page.locator("#layers-table tbody tr").first.get_attribute("data-layer")
    assert first in {EXPLODING_LAYER, "demo_mlp/hidden_1", "demo_mlp/output"}
    assert page.locator(".event-marker").count() >= 1
    ui.shot("run-exploding")
    ui.check_clean()


def test_event_marker_opens_its_details(ui, demo):
    _open_run(ui, demo.exploding.run_id)
    page = ui.page
    marker = page.locator("#norm-chart .event-marker").first
    event_id = marker.get_attribute("data-event-id")
    marker.click()
    details = page.locator("#event-details")
    details.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert details.locator("dl").get_attribute("data-event-id") == event_id
    rule = marker.get_attribute("title").split()[0]
    assert f"{rule} · critical" in details.inner_text()
    ui.shot("run-event-details")
    # "Open layer" from the event list's layer event deep-links the layer.
    page.locator(f"#events li:has-text('{EXPLODING_LAYER}')").first.click()
    details.get_by_role("button", name="Open layer").click()
    page.wait_for_url(re.compile("layer="))
    page.locator("#layer-chart canvas").first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#layer-chart").get_attribute("data-series-count") == "3"
    ui.check_clean()


def test_incident_bundle_is_shown_with_its_replay_command(ui, demo):
    _open_run(ui, demo.exploding.run_id)
    page = ui.page
    incident = page.locator("#health p.incident")
    assert incident.count() == 1
    step = incident.get_attribute("data-step")
    text = incident.inner_text()
    assert f"step {step} (non-finite gradient), 3.0 MiB on trainer-1:/home/me/" in text
    replay = f"gradwatch replay /home/me/gradwatch-runs/incidents/demo/step-{step}"
    assert incident.locator("code.replay").inner_text() == replay
    # The recorder's rows before and after the step, merged by the server.
    assert f"Around it: learning rate: 0.05 at steps {int(step) - 2}–{step}, 0.5 from step" in text
    # The run-level events holding the step (the nonfinite one among them) say so, and show
    # it in their details.
    marked = page.locator("#events li:has(.bundle-mark)")
    assert marked.count() >= 1
    assert all(" · run · " in text for text in marked.all_inner_texts())
    event = page.locator("#events li:has(.bundle-mark):has-text('nonfinite')")
    assert event.count() == 1
    event.click()
    details = page.locator("#event-details")
    details.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert details.locator("dd code.replay").inner_text() == replay
    ui.shot("run-incident")
    ui.check_clean()


def test_deep_link_restores_layer_range_and_log_scale(ui, demo):
    query = f"?layer={EXPLODING_LAYER}&from=200&to=300&log=0"
    _open_run(ui, demo.exploding.run_id, query)
    page = ui.page
    page.locator("#layer-chart canvas").first.wait_for(timeout=TIMEOUT_MS)
    assert not page.locator("#log-toggle").is_checked()  # log=0: linear
    assert page.locator("#layer-title").inner_text() == f"Layer {EXPLODING_LAYER}"
    assert page.locator("#range").inner_text() == "steps 200–300"
    assert page.locator("#layers-table tr.selected").get_attribute("data-layer") == EXPLODING_LAYER
    # The heatmap was fetched for the zoomed range: finer buckets, starting near step 200.
    info = page.locator("#heatmap-info").inner_text()
    assert "buckets of 1 steps" in info, info
    x_range = page.eval_on_selector(
        "#norm-chart", "n => [n._plot.scales.x.min, n._plot.scales.x.max]"
    )
    assert x_range == [200, 300]
    ui.shot("run-deep-link")
    # Toggling the log scale is written back into the URL.
    page.locator("#log-toggle").check()
    page.wait_for_function("!location.search.includes('log=0')")
    assert "from=200" in page.url
    ui.check_clean()


def test_compare_overlays_two_runs(ui, demo):
    ids = f"{demo.stable.run_id},{demo.exploding.run_id}"
    ui.page.goto(f"{ui.base}/compare?runs={ids}")
    ui.page.wait_for_selector("body[data-compare-ready='1']", timeout=TIMEOUT_MS)
    assert ui.page.locator("#compare-norm").get_attribute("data-series-count") == "2"
    assert ui.page.locator("#compare-loss").get_attribute("data-series-count") == "2"
    assert ui.page.eval_on_selector("#compare-norm canvas", _INKED_PIXELS) > 500
    assert ui.page.locator("#compare-table tbody tr").count() == 2
    ui.shot("compare")
    ui.check_clean()


def test_compare_is_reached_from_the_runs_list(ui, demo):
    ui.page.goto(f"{ui.base}/")
    ui.page.wait_for_selector(".verdict:not(.verdict-unknown)", timeout=TIMEOUT_MS)
    for box in ui.page.locator("#runs-table tbody input[type=checkbox]").all():
        box.check()
    ui.page.click("#compare-selected")
    ui.page.wait_for_selector("body[data-compare-ready='1']", timeout=TIMEOUT_MS)
    assert demo.stable.run_id in ui.page.url
    assert demo.exploding.run_id in ui.page.url
    ui.check_clean()


def test_api_docs_load_offline(ui, demo):
    ui.page.goto(f"{ui.base}/docs")
    ui.page.wait_for_selector(".swagger-ui .opblock", timeout=TIMEOUT_MS)
    assert ui.page.get_by_text("/api/v1/runs/{run_id}/heatmap").count() >= 1
    ui.shot("docs")
    ui.check_clean()
    ui.page.goto(f"{ui.base}/redoc")
    ui.page.wait_for_selector("redoc .api-content, [role=main]", timeout=TIMEOUT_MS)
    # ReDoc's sidebar logo lives on cdn.redoc.ly: the page's CSP refuses it in the browser.
    ui.console_errors = [e for e in ui.console_errors if "cdn.redoc.ly" not in e]
    ui.check_clean()


_INKED_PIXELS = """canvas => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let inked = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 0 && !(data[i] > 250 && data[i + 1] > 250 && data[i + 2] > 250)) inked++;
  }
  return inked;
}"""
