"""A real Prometheus scrapes a real gradwatch server while the demo's runs stream into it.

The session fixture ``demo_stack`` (conftest.py) starts Debian's ``prometheus`` with the real
``prometheus.yml`` and rules (1 s scrape and evaluation, every ``for:`` cut to 1 s), then
trains the demo's stable and exploding runs. Every wait here polls Prometheus' HTTP API
against a deadline.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.dashboards.daemon import Daemon, require_tool, wait_for
from tests.dashboards.promql import dashboard_expressions

pytestmark = pytest.mark.e2e

_DEADLINE_SECONDS = 60.0
_RUN_ALERTS = {"GradwatchGradientExplosion", "GradwatchNonFiniteGradients"}
_GRAFANA_VARIABLES = {
    "$run_id": ".*",
    "$layer": ".*",
    "$__rate_interval": "1m",
    "$__range": "1h",
}


def _prometheus(demo_stack: Any) -> Daemon:
    if demo_stack.prometheus is None:
        require_tool("prometheus")  # skips, or fails in CI
        pytest.fail("prometheus is installed but the demo stack started without it")
    prometheus: Daemon = demo_stack.prometheus
    return prometheus


def _api(prometheus: Daemon, path: str, **params: str) -> Any:
    response = httpx.get(f"{prometheus.url}/api/v1/{path}", params=params, timeout=10.0)
    body = response.json()
    assert body["status"] == "success", f"{path} {params}: {body}\n{prometheus.log_tail()}"
    return body["data"]


def _alerts(prometheus: Daemon) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = _api(prometheus, "alerts")["alerts"]
    return alerts


def _rules(prometheus: Daemon) -> list[dict[str, Any]]:
    return [rule for group in _api(prometheus, "rules")["groups"] for rule in group["rules"]]


def _last_evaluation(prometheus: Daemon) -> float:
    """Unix time of the oldest last evaluation of any rule (0 before all were evaluated)."""
    times = []
    for rule in _rules(prometheus):
        stamp = rule.get("lastEvaluation", "")
        if not stamp or stamp.startswith("0001-"):
            return 0.0
        times.append(_unix(stamp))
    return min(times)


def _unix(stamp: str) -> float:
    """Unix seconds of an RFC 3339 time stamp with up to nanoseconds."""
    trimmed = re.sub(r"(\.\d{6})\d*", r"\1", stamp.replace("Z", "+00:00"))
    return datetime.fromisoformat(trimmed).timestamp()


def _wait_for_evaluations_after(prometheus: Daemon, moment: float, rounds: int = 3) -> None:
    """Block until every rule was evaluated ``rounds`` seconds after ``moment`` (1 s interval)."""
    wait_for(
        lambda: True if _last_evaluation(prometheus) > moment + rounds else None,
        _DEADLINE_SECONDS,
        f"{rounds} more rule evaluations",
    )


def test_prometheus_fires_for_the_exploding_run_and_not_for_the_stable_one(demo_stack):
    prometheus = _prometheus(demo_stack)
    exploding, stable = demo_stack.exploding["run_id"], demo_stack.stable["run_id"]

    def firing_for_exploding() -> list[dict[str, Any]] | None:
        found = [
            alert
            for alert in _alerts(prometheus)
            if alert["state"] == "firing"
            and alert["labels"].get("run_id") == exploding
            and alert["labels"]["alertname"] in _RUN_ALERTS
        ]
        return found or None

    firing = wait_for(
        firing_for_exploding,
        _DEADLINE_SECONDS,
        f"GradwatchGradientExplosion or GradwatchNonFiniteGradients for run {exploding}",
    )
    assert {alert["labels"]["name"] for alert in firing} == {"demo-exploding"}
    assert {alert["labels"]["project"] for alert in firing} == {"demo"}
    assert all(alert["labels"]["severity"] == "critical" for alert in firing)

    # Prometheus did see the stable run, and kept evaluating: still nothing for it.
    series = _api(prometheus, "query", query=f'gradwatch_run_info{{run_id="{stable}"}}')
    assert series["result"], "Prometheus never scraped the stable run"
    _wait_for_evaluations_after(prometheus, time.time())
    stable_alerts = [
        alert for alert in _alerts(prometheus) if alert["labels"].get("run_id") == stable
    ]
    assert stable_alerts == []


def test_prometheus_evaluates_every_rule_without_error(demo_stack):
    prometheus = _prometheus(demo_stack)
    wait_for(
        lambda: True if _last_evaluation(prometheus) > 0 else None,
        _DEADLINE_SECONDS,
        "every rule to be evaluated",
    )
    unhealthy = {
        rule["name"]: rule.get("lastError", "")
        for rule in _rules(prometheus)
        if rule["health"] != "ok"
    }
    assert unhealthy == {}
    assert len(_rules(prometheus)) == 7


def test_prometheus_accepts_every_dashboard_query(demo_stack):
    prometheus = _prometheus(demo_stack)
    for where, expr in dashboard_expressions():
        query = expr
        label_values = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
        if label_values:
            query = label_values.group(1)
        for variable in sorted(_GRAFANA_VARIABLES, key=len, reverse=True):
            query = query.replace(variable, _GRAFANA_VARIABLES[variable])
        response = httpx.get(
            f"{prometheus.url}/api/v1/query", params={"query": query}, timeout=10.0
        )
        assert response.json()["status"] == "success", f"{where}: {query}: {response.text}"


def test_prometheus_dashboard_norm_query_shows_both_demo_runs(demo_stack):
    prometheus = _prometheus(demo_stack)
    (expr,) = [
        expr for where, expr in dashboard_expressions() if where == "panel 'Global gradient norm' A"
    ]
    query = expr.replace("$run_id", ".*")
    names = wait_for(
        lambda: (
            {item["metric"]["name"] for item in _api(prometheus, "query", query=query)["result"]}
            or None
        ),
        _DEADLINE_SECONDS,
        "the global norm of the demo runs",
    )
    assert names == {"demo-stable", "demo-exploding"}
