"""Alertmanager configuration: amtool checks, routing, and inhibition on a real Alertmanager."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.dashboards.daemon import Daemon, require_tool, run_tool, wait_for
from tests.dashboards.promql import DASHBOARDS, ROOT

CONFIG = DASHBOARDS / "alertmanager" / "alertmanager.yml"


def _route(*labels: str) -> str:
    amtool = require_tool("amtool")
    output = run_tool(
        [amtool, "config", "routes", "test", f"--config.file={CONFIG}", *labels], cwd=ROOT
    )
    return output.strip().splitlines()[-1].strip()


def test_amtool_check_config_accepts_alertmanager_yml():
    amtool = require_tool("amtool")
    output = run_tool([amtool, "check-config", str(CONFIG)], cwd=ROOT)
    assert "SUCCESS" in output


def test_alertmanager_routes_critical_alerts_to_their_own_receiver():
    receiver = _route("alertname=GradwatchNonFiniteGradients", "severity=critical", "run_id=r1")
    assert receiver == "gradwatch-critical"


def test_alertmanager_routes_warning_alerts_to_the_default_receiver():
    receiver = _route("alertname=GradwatchRunSilent", "severity=warning", "run_id=r1")
    assert receiver == "gradwatch-warning"


def test_alertmanager_groups_by_alert_and_run():
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert config["route"]["group_by"] == ["alertname", "run_id"]


def test_alertmanager_config_holds_no_secret():
    text = CONFIG.read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            assert httpx.URL(webhook["url"]).host in {"127.0.0.1", "localhost"}
    for word in ("password:", "api_key:", "token:", "routing_key:", "service_key:"):
        assert word not in text


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Daemon]:
    """The real Alertmanager with the repository's config, on a free 127.0.0.1 port."""
    binary = require_tool("alertmanager")

    def argv(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={CONFIG}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    with Daemon("alertmanager", argv, tmp_path / "alertmanager.log") as daemon:
        yield daemon


def _alert(name: str, severity: str, run_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, "severity": severity, "run_id": run_id},
        "annotations": {"summary": f"{name} {run_id}"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
    }


def test_alertmanager_nonfinite_inhibits_explosion_of_the_same_run_only(alertmanager):
    sent = [
        _alert("GradwatchNonFiniteGradients", "critical", "run-a"),
        _alert("GradwatchGradientExplosion", "critical", "run-a"),
        _alert("GradwatchGradientExplosion", "critical", "run-b"),
    ]
    response = httpx.post(f"{alertmanager.url}/api/v2/alerts", json=sent, timeout=10.0)
    assert response.status_code == 200, response.text

    def states() -> dict[tuple[str, str], str] | None:
        alerts = httpx.get(f"{alertmanager.url}/api/v2/alerts", timeout=10.0).json()
        found = {
            (alert["labels"]["alertname"], alert["labels"]["run_id"]): alert["status"]["state"]
            for alert in alerts
        }
        return found if len(found) == len(sent) else None

    assert wait_for(states, 30.0, "Alertmanager to list the alerts") == {
        ("GradwatchNonFiniteGradients", "run-a"): "active",
        ("GradwatchGradientExplosion", "run-a"): "suppressed",
        ("GradwatchGradientExplosion", "run-b"): "active",
    }
