"""`gradwatch demo`: the exploding run stands out from the stable one."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.cli.demo import run_demo

pytestmark = pytest.mark.e2e


def test_demo_exploding_run_shows_far_larger_norms_and_clipping(server):
    stable, exploding = run_demo(server=server.url, database_url=None, epochs=5, keep_serving=False)
    assert stable["name"] == "demo-stable"
    assert exploding["name"] == "demo-exploding"
    assert stable["num_steps"] == exploding["num_steps"] == 320
    assert stable["status"] == exploding["status"] == "finished"
    assert exploding["clipped_steps"] > 0
    assert float(exploding["max_global_norm"]) > 1000 * float(stable["max_global_norm"])

    metrics = httpx.get(f"{server.url}/metrics", timeout=10.0).text
    detections = {
        (s.labels["run_id"], s.labels["rule"], s.labels["severity"]): s.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "gradwatch_detector_events"
        for s in family.samples
    }
    explosions = sum(
        n
        for (run_id, rule, _), n in detections.items()
        if run_id == exploding["run_id"] and rule == "explosion"
    )
    assert explosions > 0
    stable_detections = {k: n for k, n in detections.items() if k[0] == stable["run_id"] and n}
    assert stable_detections == {}
    health = httpx.get(f"{server.url}/api/v1/runs/{stable['run_id']}/health", timeout=10.0)
    assert health.json()["verdict"] == "healthy"
    # The exploding run's bundle: the flight recorder's 64 steps up to it, then every step
    # after it until the run ended (64 at most), merged by the server as they came.
    incidents = httpx.get(f"{server.url}/api/v1/runs/{exploding['run_id']}/incidents").json()
    [incident] = incidents["incidents"]
    step = incident["step"]
    assert incident["recorded"]["step"] == list(range(step - 63, min(step + 64, 319) + 1))


def test_demo_command_runs_with_its_embedded_server(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradwatch.server.cli",
            "demo",
            "--epochs",
            "1",
            "--database-url",
            f"sqlite:///{tmp_path / 'demo.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo-exploding" in result.stdout
    assert "/metrics" in result.stdout
    server = re.search(r"Embedded gradwatch server at (http://127\.0\.0\.1:\d+)", result.stdout)
    assert server is not None
    pages = re.findall(rf"{re.escape(server[1])}/runs/([0-9a-f-]{{36}})", result.stdout)
    assert len(pages) == 2
    compare = re.search(rf"{re.escape(server[1])}/compare\?runs=(\S+)", result.stdout)
    assert compare is not None
    assert sorted(compare[1].split(",")) == sorted(pages)
    assert "These URLs stop working now" in result.stdout
    assert "--keep-serving" in result.stdout
