"""Every metric the rules and the dashboard use is in a real server's ``/metrics`` after a run."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboards.promql import (
    EXPORTED_METRICS,
    PROMETHEUS_SERIES,
    dashboard_expressions,
    metric_names,
    recording_rule_names,
    rule_expressions,
)

pytestmark = pytest.mark.e2e

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
}


def _exposed_names(text: str) -> set[str]:
    """Series names a scrape of ``text`` can produce (families without samples included)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _used_names() -> set[str]:
    expressions = [expr for _, expr in rule_expressions()]
    expressions += [expr for _, expr in dashboard_expressions()]
    used = set().union(*(metric_names(expr) for expr in expressions))
    return used - recording_rule_names() - PROMETHEUS_SERIES


def test_metrics_endpoint_exposes_every_name_the_rules_and_dashboard_use(demo_stack):
    text = httpx.get(f"{demo_stack.server.url}/metrics", timeout=10.0).text
    missing = sorted(_used_names() - _exposed_names(text))
    assert missing == [], f"used by rules or dashboard but not in /metrics: {missing}"


def test_metrics_endpoint_exposes_every_name_the_exporter_promises(demo_stack):
    text = httpx.get(f"{demo_stack.server.url}/metrics", timeout=10.0).text
    missing = sorted(EXPORTED_METRICS - _exposed_names(text))
    assert missing == [], f"not in /metrics: {missing}"


def test_metrics_endpoint_exports_the_demo_runs_with_their_run_id(demo_stack):
    text = httpx.get(f"{demo_stack.server.url}/metrics", timeout=10.0).text
    run_ids = {
        sample.labels["run_id"]
        for family in text_string_to_metric_families(text)
        if family.name == "gradwatch_run_info"
        for sample in family.samples
    }
    assert {demo_stack.stable["run_id"], demo_stack.exploding["run_id"]} <= run_ids
