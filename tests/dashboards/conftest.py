"""Fixtures: a real gradwatch server, the demo's runs streamed into it, and a real Prometheus.

``gradwatch_server`` (once per session) is a uvicorn server on 127.0.0.1 with a temporary
SQLite file. ``demo_stack`` starts Debian's ``prometheus`` scraping it every second with the
repository's rules (when the binary is installed), then trains the demo's stable and exploding
Keras runs into the server. Teardown stops Prometheus, then the server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.dashboards.daemon import Daemon
from tests.dashboards.promql import DASHBOARDS, RULES

if TYPE_CHECKING:  # the server is imported by the fixtures only, so static checks never need it
    from gradwatch.server.embedded import EmbeddedServer

_EVALUATION_SECONDS = 1
_TEST_FOR = "1s"
"""``for:`` of every alert in the end-to-end copy of the rules (the real ones wait minutes)."""


@pytest.fixture(scope="session")
def gradwatch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A real gradwatch server on a free 127.0.0.1 port with its own SQLite file (session)."""
    from gradwatch.server.config import Settings
    from gradwatch.server.embedded import EmbeddedServer

    database = tmp_path_factory.mktemp("gradwatch-server") / "gradwatch.db"
    with EmbeddedServer(Settings(database_url=f"sqlite:///{database}")) as running:
        yield running


@dataclass(frozen=True)
class DemoStack:
    """The session's server, its Prometheus (None when not installed) and the demo's runs."""

    server: EmbeddedServer
    prometheus: Daemon | None
    stable: dict[str, Any]
    exploding: dict[str, Any]


def write_test_rules(path: Path) -> Path:
    """Write the real rules with every ``for:`` shortened to one second; return ``path``."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = _TEST_FOR
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def write_test_config(folder: Path, target: str) -> Path:
    """The real prometheus.yml with 1 s intervals, scraping only ``target``, no Alertmanager."""
    config = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text("utf-8"))
    interval = f"{_EVALUATION_SECONDS}s"
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    config.pop("alerting", None)
    rules = write_test_rules(folder / "gradwatch.rules.yml")
    config["rule_files"] = [str(rules)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gradwatch"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def prometheus_daemon(folder: Path, target: str) -> Daemon:
    """A Prometheus (not started) scraping ``target`` with the test copy of the rules."""
    binary = shutil.which("prometheus")
    assert binary is not None
    config = write_test_config(folder, target)
    data = folder / "data"

    def argv(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]

    return Daemon("prometheus", argv, folder / "prometheus.log")


@pytest.fixture(scope="session")
def demo_stack(
    gradwatch_server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DemoStack]:
    """The server + Prometheus (if installed) + the demo's two runs, once per session."""
    pytest.importorskip("keras", reason="the demo trains Keras models: pip install -e '.[all]'")
    from gradwatch.server.cli.demo import run_demo

    server = gradwatch_server
    prometheus = None
    if shutil.which("prometheus") is not None:
        folder = tmp_path_factory.mktemp("prometheus")
        prometheus = prometheus_daemon(folder, f"{server.host}:{server.port}")
        prometheus.start()
    try:
        stable, exploding = run_demo(
            server=server.url, database_url=None, epochs=5, keep_serving=False
        )
        yield DemoStack(server, prometheus, stable, exploding)
    finally:
        if prometheus is not None:
            prometheus.stop()
