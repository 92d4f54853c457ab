"""ruff and mypy run as part of the test command, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "agent", "server", "wire", "tests", "bench"],
        ["ruff", "format", "--check", "agent", "server", "wire", "tests", "bench"],
    ],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff_is_clean(command):
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "-p",
            "gradwatch.agent",
            "-p",
            "gradwatch.server",
            "-p",
            "gradwatch.wire",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
