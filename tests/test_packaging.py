"""The distribution: the built wheel carries every module, and the agent stays light."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("gradwatch-*.whl")
    return path


def test_wheel_contains_every_module_and_migration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"gradwatch/{folder}/{p.relative_to(ROOT / folder)}"
        for folder in ("agent", "wire")
        for p in (ROOT / folder).rglob("*.py")
    }
    expected |= {
        f"gradwatch/server/{p.relative_to(ROOT / 'server')}"
        for p in (ROOT / "server").rglob("*.py")
    }
    expected |= {
        "gradwatch/server/store/alembic.ini",
        "gradwatch/server/store/migrations/script.py.mako",
    }
    # The web UI and its vendored libraries (with their licences) are package data.
    expected |= {
        f"gradwatch/server/{p.relative_to(ROOT / 'server')}"
        for p in (ROOT / "server" / "ui" / "static").rglob("*")
        if p.is_file()
    }
    assert "gradwatch/server/ui/static/vendor/uplot/LICENSE" in expected
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith("gradwatch/__init__") for n in names)  # namespace package


def test_wheel_imports_and_migrates_without_the_source_tree(wheel, tmp_path):
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # -S skips .pth files, so the editable install of this checkout is invisible;
    # dependencies still come from site-packages.
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
        "import gradwatch.server.app as app, gradwatch.server.store.db as db;"
        "assert app.__file__.startswith(sys.argv[1]), app.__file__;"
        "db.upgrade_database('sqlite:///' + sys.argv[3]);"
        "import gradwatch.agent as agent; assert agent.__file__.startswith(sys.argv[1])"
    )
    subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            code,
            str(unpacked),
            sysconfig.get_paths()["purelib"],
            str(tmp_path / "w.db"),
        ],
        check=True,
        cwd=tmp_path,
    )


def test_agent_import_does_not_pull_server_libraries():
    code = (
        "import sys, gradwatch.agent;"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'uvicorn', 'alembic') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_lists_commands():
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch.server.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "server" in result.stdout
    assert "demo" in result.stdout


def test_agent_delivery_modules_load_without_tensorflow():
    # `gradwatch upload` replays spools and local files: it must not need TensorFlow.
    code = (
        "import sys, gradwatch.agent, gradwatch.agent.transport, gradwatch.agent.spool;"
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
