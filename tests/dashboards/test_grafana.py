"""Grafana provisioning and the generated dashboard (dashboards/grafana)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.dashboards.promql import (
    DASHBOARD,
    DASHBOARDS,
    EXPORTED_METRICS,
    PROMETHEUS_SERIES,
    ROOT,
    dashboard_expressions,
    metric_names,
    recording_rule_names,
)

GRAFANA = DASHBOARDS / "grafana"
BUILD = GRAFANA / "build.py"
DATASOURCE_UID = "gradwatch-prometheus"


def _build_module() -> ModuleType:
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[dev]'")
    spec = importlib.util.spec_from_file_location("gradwatch_dashboard_build", BUILD)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def test_dashboard_json_is_byte_equal_to_a_regeneration():
    build = _build_module()
    assert build.render() == DASHBOARD.read_text(encoding="utf-8"), (
        "dashboards/grafana/dashboards/gradwatch.json is stale: "
        "run python dashboards/grafana/build.py and commit the result"
    )


def test_dashboard_build_check_flag_reports_a_fresh_file():
    _build_module()
    result = subprocess.run(
        [sys.executable, str(BUILD), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_build_check_flag_reports_a_stale_file(tmp_path):
    build = _build_module()
    stale = tmp_path / "gradwatch.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert build.main(["--check", "--output", str(stale)]) == 1


def test_dashboard_expressions_use_only_known_metrics():
    known = EXPORTED_METRICS | PROMETHEUS_SERIES | recording_rule_names()
    unknown = {
        where: sorted(metric_names(expr) - known)
        for where, expr in dashboard_expressions()
        if metric_names(expr) - known
    }
    assert unknown == {}


def test_dashboard_every_query_uses_the_provisioned_datasource():
    dashboard = _dashboard()
    refs = [panel["datasource"] for panel in _panels()]
    refs += [target["datasource"] for panel in _panels() for target in panel["targets"]]
    refs += [variable["datasource"] for variable in dashboard["templating"]["list"]]
    refs += [annotation["datasource"] for annotation in dashboard["annotations"]["list"]]
    assert refs
    assert all(ref == {"type": "prometheus", "uid": DATASOURCE_UID} for ref in refs)


def test_dashboard_has_run_id_and_layer_variables():
    variables = {variable["name"]: variable for variable in _dashboard()["templating"]["list"]}
    assert set(variables) == {"run_id", "layer"}
    assert variables["run_id"]["query"] == "label_values(gradwatch_run_info, run_id)"
    assert variables["layer"]["query"].startswith("label_values(gradwatch_layer_grad_norm{")
    assert variables["layer"]["query"].endswith(", layer)")


def test_dashboard_run_queries_filter_on_the_run_id_variable():
    run_level = EXPORTED_METRICS - {
        "gradwatch_ingest_samples_total",
        "gradwatch_ingest_rejected_total",
        "gradwatch_ingest_request_duration_seconds_bucket",
    }
    for where, expr in dashboard_expressions():
        if where.startswith("variable 'run_id'"):
            continue
        if metric_names(expr) & run_level or "ALERTS" in metric_names(expr):
            assert 'run_id=~"$run_id"' in expr, where


@pytest.mark.parametrize(
    ("title", "metrics"),
    [
        (
            "Global gradient norm",
            {
                "gradwatch_global_grad_norm",
                "gradwatch_global_grad_norm_clipped",
                "gradwatch_global_grad_norm_window_max",
            },
        ),
        ("Clip rate", {"gradwatch_clipped_steps_total", "gradwatch_steps_total"}),
        ("Layer gradient norms (top K)", {"gradwatch_layer_grad_norm"}),
        (
            "Non-finite gradient values and skipped steps",
            {"gradwatch_nonfinite_grad_values_total"},
        ),
        ("Detector events", {"gradwatch_detector_events_total"}),
        ("Loss", {"gradwatch_loss"}),
        ("Last ingest age", {"gradwatch_run_last_ingest_timestamp_seconds"}),
        ("Firing alerts", {"ALERTS"}),
    ],
)
def test_dashboard_has_panel(title, metrics):
    panels = [panel for panel in _panels() if panel["title"] == title]
    assert panels, f"no panel {title!r}"
    used = {name for panel in panels for t in panel["targets"] for name in metric_names(t["expr"])}
    assert metrics <= used


def test_dashboard_panels_have_unique_ids_and_fit_the_grid():
    panels = _dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_grafana_datasource_provisioning_has_the_fixed_uid():
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = config["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"


def test_grafana_dashboard_provider_reads_files():
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/gradwatch.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_dashboard_build_script_is_ruff_clean_and_mypy_strict():
    for command in (
        ["ruff", "check", "dashboards"],
        ["ruff", "format", "--check", "dashboards"],
    ):
        if shutil.which(command[0]) is None:
            pytest.fail("ruff is not installed: pip install -e '.[dev]'")
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    _build_module()
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", str(BUILD)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
