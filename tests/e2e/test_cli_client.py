"""The read commands (`runs`, `show`, `check`, `open`) through the real console script.

One real server per module on 127.0.0.1 holds runs posted over HTTP (no TensorFlow): a
healthy one, a critical one (an explosion, then non-finite gradients), a warning one (vanishing
gradients) and one without data. Every command runs as the `gradwatch` process a user or a CI
job starts, and its exit code is the contract (0 ok, 1 check failed, 2 usage or configuration
error, 3 server unreachable).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from tests.server.wire import create_run, make_batch, post_batch
from tests.server_process import free_port

pytestmark = pytest.mark.e2e

_SCRIPT = Path(sys.executable).with_name("gradwatch")
GRADWATCH = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("gradwatch") or "gradwatch"]
"""The console script that `pip install` made, next to this interpreter."""


@dataclass(frozen=True)
class Seeded:
    url: str
    healthy: str
    critical: str
    warning: str
    empty: str


def gradwatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `gradwatch ARGS` with no GRADWATCH_* settings but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    clean.update({"COLUMNS": "120", "BROWSER": "true", **(env or {})})
    return subprocess.run(
        [*GRADWATCH, *args], capture_output=True, text=True, timeout=60, env=clean
    )


def _post_steps(api: httpx.Client, run_id: str, steps: int, norm_of, nonfinite_at=()) -> None:
    rng = random.Random(run_id)
    for start in range(0, steps, 100):
        window = list(range(start, min(start + 100, steps)))
        grad = [[norm_of(step) * rng.uniform(0.8, 1.2) for _ in range(2)] for step in window]
        global_norm = [math.hypot(*row) for row in grad]
        nonfinite = [[0, 0] for _ in window]
        for index, step in enumerate(window):
            if step in nonfinite_at:
                grad[index][1] = global_norm[index] = math.inf
                nonfinite[index][1] = 5
        body = make_batch(window, grad_norm=grad, global_norm=global_norm, nonfinite=nonfinite)
        assert post_batch(api, run_id, body).status_code == 200


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Iterator[Seeded]:
    database = tmp_path_factory.mktemp("cli") / "gradwatch.db"
    with (
        EmbeddedServer(Settings(database_url=f"sqlite:///{database}")) as server,
        httpx.Client(base_url=server.url, timeout=10.0) as api,
    ):
        healthy = create_run(api, "healthy-run", project="vision")
        _post_steps(api, healthy, 400, lambda step: 1.0)
        critical = create_run(api, "exploding-run", project="vision")
        _post_steps(api, critical, 400, lambda step: 1.0 if step < 300 else 1e4, nonfinite_at={350})
        warning = create_run(api, "vanishing-run", project="nlp")
        _post_steps(api, warning, 150, lambda step: 1e-9)
        empty = create_run(api, "empty-run", project="nlp")
        yield Seeded(server.url, healthy, critical, warning, empty)


@pytest.fixture(scope="module")
def env(seeded) -> dict[str, str]:
    return {"GRADWATCH_SERVER": seeded.url}


@pytest.mark.parametrize(
    ("run", "args", "code"),
    [
        ("healthy", (), 0),
        ("critical", (), 1),
        ("critical", ("--whole-run",), 1),
        ("warning", (), 0),
        ("warning", ("--fail-on", "warning"), 1),
        ("healthy", ("--fail-on", "warning"), 0),
        ("healthy", ("--max-global-norm", "1e-3"), 1),
        ("healthy", ("--max-global-norm", "100"), 0),
        ("empty", (), 0),
        ("empty", ("--no-data-fails",), 1),
    ],
)
def test_check_exit_code_says_whether_the_run_passes(seeded, env, run, args, code):
    result = gradwatch("check", getattr(seeded, run), *args, env=env)

    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # the one-line reason
    assert lines[0].startswith("ok: " if code == 0 else "check failed: ")
    assert "Traceback" not in result.stderr


def test_check_reason_names_the_verdict_and_the_last_event(seeded, env):
    result = gradwatch("check", seeded.critical, env=env)

    assert result.returncode == 1
    assert "exploding-run" in result.stdout
    assert "health critical" in result.stdout
    assert "nonfinite" in result.stdout


def test_check_gates_a_shell_pipeline(seeded, env):
    script = 'gradwatch check "$1" && echo deploy'
    shell_env = {**env, "PATH": f"{Path(GRADWATCH[0]).parent}{os.pathsep}{os.environ['PATH']}"}

    passed = gradwatch_shell(script, seeded.healthy, shell_env)
    failed = gradwatch_shell(script, seeded.critical, shell_env)

    assert passed.returncode == 0
    assert passed.stdout.strip().splitlines()[-1] == "deploy"
    assert failed.returncode == 1
    assert "deploy" not in failed.stdout


def gradwatch_shell(script: str, run: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    return subprocess.run(
        ["bash", "-c", script, "gate", run],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def test_check_of_an_unknown_run_is_a_usage_error(env):
    result = gradwatch("check", "no-such-run", env=env)

    assert result.returncode == 2
    assert "no run 'no-such-run'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_exits_3_with_one_line():
    url = f"http://127.0.0.1:{free_port()}"

    for args in (("check", "some-run"), ("runs",), ("show", "some-run"), ("open", "x-run")):
        result = gradwatch(*args, "--server", url)
        assert result.returncode == 3, (args, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"gradwatch {args[0]}: cannot reach the gradwatch server at {url}")


def test_bad_server_url_is_a_usage_error():
    result = gradwatch("runs", "--server", "localhost:8000")

    assert result.returncode == 2
    assert "--server 'localhost:8000'" in result.stderr


def test_runs_json_holds_every_run_with_its_verdict(seeded, env):
    result = gradwatch("runs", "--json", env=env)

    assert result.returncode == 0, result.stderr
    runs = {run["run_id"]: run for run in json.loads(result.stdout)}
    assert set(runs) >= {seeded.healthy, seeded.critical, seeded.warning, seeded.empty}
    assert runs[seeded.healthy]["verdict"] == "healthy"
    assert runs[seeded.critical]["verdict"] == "critical"
    assert runs[seeded.warning]["verdict"] == "warning"
    assert runs[seeded.critical]["max_global_norm"] == "Infinity"
    assert runs[seeded.critical]["nonfinite_steps"] == 1
    assert runs[seeded.empty]["num_steps"] == 0
    assert runs[seeded.healthy]["url"] == f"{seeded.url}/runs/{seeded.healthy}"


def test_runs_filters_and_table(seeded, env):
    nlp = gradwatch("runs", "--json", "--project", "nlp", env=env)
    limited = gradwatch("runs", "--json", "--project", "nlp", "--limit", "1", env=env)
    table = gradwatch("runs", "--status", "running", env=env)

    assert {run["run_id"] for run in json.loads(nlp.stdout)} == {seeded.warning, seeded.empty}
    assert [run["run_id"] for run in json.loads(limited.stdout)] == [seeded.empty]  # newest
    assert table.returncode == 0, table.stderr
    for name, prefix in (("exploding-run", seeded.critical[:8]), ("healthy-run", None)):
        assert name in table.stdout
        assert prefix is None or prefix in table.stdout
    assert "critical" in table.stdout


def test_show_json_holds_run_health_events_and_bucketed_norms(seeded, env):
    result = gradwatch("show", seeded.critical, "--json", "--width", "40", env=env)

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["run"]["run_id"] == seeded.critical
    assert shown["run"]["num_steps"] == 400
    assert shown["health"]["verdict"] == "critical"
    assert {event["rule"] for event in shown["events"]} >= {"explosion", "nonfinite"}
    norms = shown["global_norm"]
    assert norms["downsampled"] is True
    assert len(norms["step"]) <= 40
    assert "Infinity" in norms["max"]
    assert shown["url"] == f"{seeded.url}/runs/{seeded.critical}"


def test_show_draws_the_norm_with_inf_marked(seeded, env):
    result = gradwatch("show", "exploding-run", "--width", "50", env=env)

    assert result.returncode == 0, result.stderr
    assert "exploding-run" in result.stdout
    assert "critical" in result.stdout
    sparkline = next(line for line in result.stdout.splitlines() if "▁" in line)
    assert "∞" in sparkline
    assert "█" in sparkline
    assert len(sparkline.strip()) <= 50
    assert f"/runs/{seeded.critical}" in result.stdout


def test_show_says_which_layer_went_first(seeded, env):
    result = gradwatch("show", "exploding-run", "--width", "50", env=env)

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps the line at the terminal's width
    # The newest run-level event is the Inf planted in the second layer at step 350; both
    # layers left their baselines with the ×10⁴ jump at step 300.
    assert "onset: nonfinite from step 350: first: `dense_1` at step 300" in text, text
    assert "first non-finite layer: `dense_1` from the output side" in text, text


def test_show_finds_a_run_by_id_prefix_and_says_when_a_name_is_ambiguous(seeded, env):
    by_prefix = gradwatch("show", seeded.healthy[:8], "--json", env=env)
    with httpx.Client(base_url=seeded.url, timeout=10.0) as api:
        twin = create_run(api, "twin", project="twins")
        other = create_run(api, "twin", project="twins")
    ambiguous = gradwatch("show", "twin", env=env)

    assert by_prefix.returncode == 0, by_prefix.stderr
    assert json.loads(by_prefix.stdout)["run"]["run_id"] == seeded.healthy
    assert ambiguous.returncode == 2
    assert "ambiguous" in ambiguous.stderr
    assert twin in ambiguous.stderr
    assert other in ambiguous.stderr


def test_show_of_a_run_without_data(seeded, env):
    result = gradwatch("show", seeded.empty, env=env)

    assert result.returncode == 0, result.stderr
    assert "no data yet" in result.stdout


def test_open_prints_the_run_page_and_hands_it_to_the_browser(seeded, env, tmp_path):
    opened = tmp_path / "opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)

    quiet = gradwatch("open", "healthy-run", "--no-browser", env=env)
    with_browser = gradwatch("open", seeded.critical, env={**env, "BROWSER": str(browser)})

    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == f"{seeded.url}/runs/{seeded.healthy}"
    assert with_browser.returncode == 0, with_browser.stderr
    assert with_browser.stdout.strip() == f"{seeded.url}/runs/{seeded.critical}"
    assert opened.read_text().strip() == f"{seeded.url}/runs/{seeded.critical}"


@pytest.fixture(scope="module")
def authed(tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """A server with tokens: (url, read token of project p, run id in p)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('auth') / 'auth.db'}"

    def token(*scopes: str) -> str:
        args = ["token", "create", "--project", "p", "--database-url", url]
        for scope in scopes:
            args += ["--scope", scope]
        result = gradwatch(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    ingest, read = token("ingest"), token("read")
    with (
        EmbeddedServer(Settings(database_url=url)) as server,
        httpx.Client(
            base_url=server.url, timeout=10.0, headers={"Authorization": f"Bearer {ingest}"}
        ) as api,
    ):
        run_id = create_run(api, "authed", project="p")
        _post_steps(api, run_id, 100, lambda step: 1.0)
        yield server.url, read, run_id


def test_tokens_from_flag_or_environment_and_refusals(authed):
    url, read, run_id = authed

    by_flag = gradwatch("check", run_id, "--server", url, "--token", read)
    by_env = gradwatch("runs", "--json", env={"GRADWATCH_SERVER": url, "GRADWATCH_TOKEN": read})
    missing = gradwatch("check", run_id, "--server", url)
    wrong = gradwatch("check", run_id, "--server", url, "--token", "gw_wrong_token")
    wrong_runs = gradwatch("runs", "--server", url, "--token", "gw_wrong_token")

    assert by_flag.returncode == 0, by_flag.stderr
    assert [run["run_id"] for run in json.loads(by_env.stdout)] == [run_id]
    for refused in (missing, wrong, wrong_runs):
        assert refused.returncode == 2, refused.stderr
        assert "401" in refused.stderr
        assert "GRADWATCH_TOKEN" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "Traceback" not in refused.stderr


def test_module_entry_point_is_the_same_command(seeded):
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch.server.cli", "check", seeded.healthy],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GRADWATCH_SERVER": seeded.url},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: healthy-run")


def test_version_and_help_of_the_console_script():
    version = gradwatch("--version")
    check_help = gradwatch("check", "--help")

    assert version.returncode == 0
    assert version.stdout.startswith("gradwatch ")
    assert check_help.returncode == 0
    assert "--server" in check_help.stdout
    assert "URL" in check_help.stdout
    assert "<str>" not in check_help.stdout
    assert "<bool>" not in check_help.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("db", "upgrade", "--database-url", "foo://x"), "db upgrade: bad database URL 'foo://x'"),
        (("db", "upgrade", "--database-url", "not a url"), "db upgrade: bad database URL"),
        (("server", "--database-url", "sqlite:////no/such/dir/g.db"), "server: cannot open"),
        (("token", "list", "--database-url", "foo://x"), "token list: bad database URL"),
    ],
)
def test_bad_database_url_is_one_line_and_exit_2(args, message):
    result = gradwatch(*args)

    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gradwatch {message}")
