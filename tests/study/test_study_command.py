"""``gradwatch study`` end to end: the real console script, real ``model.fit`` runs streamed
to its embedded server on 127.0.0.1, and the report opened in Debian's headless Chromium.

A reduced study: the built-in deep MLP, SGD and Adam, no remedy / ``global_norm``, 40 steps
per cell (8 cells and 2 warm-ups; each cell is a fresh model traced and fitted, ~4 s). The
MLP's high SGD rate explodes unclipped after about 23 steps, so the assertions below hold
with the fixed seed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.server.study.result import study_from_json
from tests.ui.conftest import artifacts_dir, chromium_missing

pytestmark = pytest.mark.e2e

_SCRIPT = Path(sys.executable).with_name("gradwatch")
GRADWATCH = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("gradwatch") or "gradwatch"]

OPTIMIZERS = ("sgd", "adam")
REMEDIES = ("none", "global_norm")


def gradwatch(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``gradwatch ARGS`` with no GRADWATCH_* settings from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update({"COLUMNS": "160", "TF_CPP_MIN_LOG_LEVEL": "3"})
    return subprocess.run([*GRADWATCH, *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "report"
    result = gradwatch(
        "study",
        "--problem",
        "mlp",
        "--optimizers",
        ",".join(OPTIMIZERS),
        "--remedies",
        ",".join(REMEDIES),
        "--steps",
        "40",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, out


def test_study_writes_a_report_with_every_cell(reduced):
    _, out = reduced
    assert (out / "report.html").is_file()
    study = study_from_json(json.loads((out / "study.json").read_text()))
    assert study.steps == 40
    cells = {(c.optimizer, c.remedy, c.rate): c for c in study.cells}
    expected = {(o, r, rate) for o in OPTIMIZERS for r in REMEDIES for rate in ("low", "high")}
    assert set(cells) == expected
    for cell in study.cells:
        assert cell.run_id
        assert 0 < cell.steps <= 40
        assert len(cell.curve.steps) == cell.steps, cell.run_name
        assert cell.seconds_per_step > 0
    assert set(study.thresholds) == set(OPTIMIZERS)
    assert all(t.global_norm > 0 and t.warmup_steps == 10 for t in study.thresholds.values())
    assert study.summary


def test_study_unclipped_high_rate_sgd_diverges_and_a_clipped_cell_does_not(reduced):
    _, out = reduced
    study = study_from_json(json.loads((out / "study.json").read_text()))
    plain = study.cell("sgd", "none", "high")
    assert plain is not None
    assert plain.diverged
    clipped = [c for c in study.cells if c.rate == "high" and c.remedy != "none"]
    assert any(not c.diverged for c in clipped if c.optimizer == "sgd")
    assert all(c.clipped_steps > 0 for c in clipped if c.remedy == "global_norm")
    # Every low-rate cell trains.
    assert not any(c.diverged for c in study.cells if c.rate == "low")


def test_study_prints_the_table_summary_and_compare_urls(reduced):
    result, out = reduced
    assert "gradwatch study: mlp" in result.stdout
    assert "Summary" in result.stdout
    assert str(out / "report.html") in result.stdout
    assert result.stdout.count("/compare?runs=") == 4
    assert "Traceback" not in result.stderr


def test_study_report_opens_in_chromium_and_shows_the_curves(reduced):
    missing = chromium_missing()
    if missing:
        if os.environ.get("GRADWATCH_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"GRADWATCH_REQUIRE_CHROMIUM=1 but {missing}")
        pytest.skip(missing)
    from tests.study.browser import open_report

    _, out = reduced
    with open_report(out / "report.html") as opened:
        page = opened.page
        assert page.locator("#results tr[data-run]").count() == len(OPTIMIZERS) * len(REMEDIES) * 2
        sections = page.locator("section.curves")
        assert sections.count() == 4
        for index in range(4):
            section = sections.nth(index)
            assert section.locator("svg.chart").count() == 2
            line = section.locator("polyline.series").first
            box = line.bounding_box()
            assert box is not None, section.get_attribute("id")
            assert box["width"] > 100, section.get_attribute("id")
        page.screenshot(path=str(artifacts_dir() / "study-report.png"), full_page=True)
        assert opened.blocked == []
        assert opened.console_errors == []


def test_study_refuses_bad_options_with_exit_code_2():
    result = gradwatch("study", "--optimizers", "sgd,lion")
    assert result.returncode == 2
    assert "gradwatch study: --optimizers" in result.stderr
    assert "Traceback" not in result.stderr
