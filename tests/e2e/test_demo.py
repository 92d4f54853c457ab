"""`gradwatch demo`: the exploding run stands out from the stable one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradwatch.server.demo import run_demo

pytestmark = pytest.mark.e2e


def test_demo_exploding_run_shows_far_larger_norms_and_clipping(server):
    stable, exploding = run_demo(server=server.url, database_url=None, epochs=2, keep_serving=False)
    assert stable["name"] == "demo-stable"
    assert exploding["name"] == "demo-exploding"
    assert stable["num_steps"] == exploding["num_steps"] == 128
    assert stable["status"] == exploding["status"] == "finished"
    assert exploding["clipped_steps"] > 0
    assert float(exploding["max_global_norm"]) > 1000 * float(stable["max_global_norm"])


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
