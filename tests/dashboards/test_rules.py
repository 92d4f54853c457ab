"""Prometheus configuration and alert rules: promtool checks, unit tests, and their conventions."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import pytest
import yaml

from tests.dashboards.daemon import require_tool, run_tool
from tests.dashboards.promql import (
    DASHBOARDS,
    EXPORTED_METRICS,
    ROOT,
    RULE_TESTS,
    RULES,
    load_rules,
    metric_names,
    recording_rule_names,
    rule_expressions,
)

ALERTS = {
    "GradwatchGradientExplosion",
    "GradwatchNonFiniteGradients",
    "GradwatchVanishingGradients",
    "GradwatchHighClipRate",
    "GradwatchRunSilent",
}


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def _readme_anchors() -> set[str]:
    """GitHub's anchors of the README's headings (lowercase, punctuation dropped, - for spaces)."""
    anchors = set()
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            text = heading.group(1).strip().lower()
            text = "".join(
                char
                for char in text
                if char in "-_ " or unicodedata.category(char)[0] in "LN"  # letters, digits
            )
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_promtool_check_rules_accepts_the_rules():
    promtool = require_tool("promtool")
    output = run_tool([promtool, "check", "rules", str(RULES)], cwd=ROOT)
    assert "SUCCESS" in output


def test_promtool_unit_tests_pass():
    promtool = require_tool("promtool")
    output = run_tool([promtool, "test", "rules", str(RULE_TESTS)], cwd=ROOT)
    assert "SUCCESS" in output


def test_promtool_check_config_accepts_prometheus_yml_and_finds_the_rules():
    promtool = require_tool("promtool")
    config = DASHBOARDS / "prometheus" / "prometheus.yml"
    output = run_tool([promtool, "check", "config", str(config)], cwd=ROOT)
    assert "1 rule files found" in output
    assert str(RULES.name) in output


def test_rules_define_exactly_the_design_alerts():
    assert {rule["alert"] for rule in _alert_rules()} == ALERTS


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_rules_alert_has_severity_annotations_and_a_readme_runbook(alert):
    (rule,) = [rule for rule in _alert_rules() if rule["alert"] == alert]
    assert rule["labels"]["severity"] in {"warning", "critical"}
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url", "run_url"}
    assert "$labels.run_id" in annotations["description"]
    # The run page of the web UI (server/ui/routes.py), on the server's public URL.
    assert annotations["run_url"].endswith("/runs/{{ $labels.run_id }}")
    assert "$externalLabels.gradwatch_url" in annotations["run_url"]
    assert annotations["runbook_url"] == f"README.md#{alert.lower()}"
    assert alert.lower() in _readme_anchors(), f"README has no heading '{alert}' (the runbook)"
    assert "for" in rule, "every alert waits a `for:` (tested just before and after it)"


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_rules_alert_keeps_run_id_and_joins_the_run_name(alert):
    (rule,) = [rule for rule in _alert_rules() if rule["alert"] == alert]
    expr = " ".join(rule["expr"].split())
    assert expr.endswith(
        "* on (run_id) group_left (project, name) "
        "max by (run_id, project, name) (gradwatch_run_info)"
    )


def test_rules_use_only_exported_metrics():
    known = EXPORTED_METRICS | recording_rule_names()
    unknown = {
        name: sorted(metric_names(expr) - known)
        for name, expr in rule_expressions()
        if metric_names(expr) - known
    }
    assert unknown == {}


def test_rules_detect_nonfinite_gradients_from_counters_only():
    rules = {rule.get("alert") or rule["record"]: rule for rule in load_rules()}
    used = metric_names(rules["GradwatchNonFiniteGradients"]["expr"]) - {"gradwatch_run_info"}
    sources = set().union(
        *(metric_names(rules[name]["expr"]) if name in rules else {name} for name in used)
    )
    assert sources == {"gradwatch_nonfinite_grad_values_total"}  # a counter: NaN-proof


def test_rules_baselines_look_at_the_past_through_offset():
    (rule,) = [rule for rule in _alert_rules() if rule["alert"] == "GradwatchGradientExplosion"]
    assert re.search(r"quantile_over_time\([^)]*\[30m\] offset 5m\)", rule["expr"])


def test_rules_run_silent_only_for_running_runs():
    (rule,) = [rule for rule in _alert_rules() if rule["alert"] == "GradwatchRunSilent"]
    assert 'gradwatch_run_info{status="running"}' in rule["expr"]


def test_rule_tests_check_every_alert_just_before_and_after_its_for():
    document = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    quiet: set[str] = set()
    firing: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                firing.add(check["alertname"])
                for alert in check["exp_alerts"]:
                    assert "run_id" in alert["exp_labels"], case["name"]
                    assert set(alert["exp_annotations"]) == {
                        "summary",
                        "description",
                        "runbook_url",
                        "run_url",
                    }
            else:
                quiet.add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS
