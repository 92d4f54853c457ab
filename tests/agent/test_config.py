"""Bad configuration raises at construction, naming the argument."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch.agent import ConfigError, GradientMonitor, clip
from gradwatch.agent.config import MonitorConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"run": ""}, "run"),
        ({"server": "localhost:8000"}, "server"),
        ({"server": "ftp://example"}, "server"),
        ({"server": "http://127.0.0.1:99999"}, "server"),
        ({"project": "has space"}, "project"),
        ({"run_id": "not-a-uuid"}, "run_id"),
        ({"flush_every": 0}, "flush_every"),
        ({"flush_every": 2.5}, "flush_every"),
        ({"flush_every": True}, "flush_every"),
        ({"stats_every": -1}, "stats_every"),
        ({"stats_every": 2.0}, "stats_every"),
        ({"stats_every": None}, "stats_every"),
        ({"queue_size": -1}, "queue_size"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds"),
        ({"retry_deadline_seconds": float("inf")}, "retry_deadline_seconds"),
        ({"spool_max_bytes": -1}, "spool_max_bytes"),
        ({"spool_max_bytes": 1.5}, "spool_max_bytes"),
        ({"spool_max_bytes": True}, "spool_max_bytes"),
        ({"queue_max_bytes": 0}, "queue_max_bytes"),
        ({"close_timeout_seconds": 0}, "close_timeout_seconds"),
        ({"close_timeout_seconds": float("nan")}, "close_timeout_seconds"),
        ({"spool_dir": 3}, "spool_dir"),
        ({"local_dir": None}, "local_dir"),
    ],
)
def test_monitor_config_rejects_bad_field_by_name(kwargs, field):
    args = {"run": "r", **kwargs}
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        MonitorConfig(**args)


def test_monitor_config_normalises_server_and_generates_run_id():
    config = MonitorConfig(run="r", server="http://127.0.0.1:8000/")
    assert config.server == "http://127.0.0.1:8000"
    assert len(config.run_id) == 36


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_global_norm_rejects_bad_max_norm(bad):
    with pytest.raises(ConfigError, match=r"^max_norm:"):
        clip.global_norm(bad)


def test_gradient_monitor_rejects_a_bad_stats_every_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^stats_every: .*0 turns weight statistics off"):
        GradientMonitor(run="r", local_dir=str(tmp_path), stats_every=-5)


def test_gradient_monitor_rejects_non_policy(tmp_path):
    with pytest.raises(ConfigError, match=r"^policy:"):
        GradientMonitor(run="r", policy=1.0, local_dir=str(tmp_path))  # type: ignore[arg-type]


def test_monitor_config_defaults_spool_dir_to_the_user_cache_dir():
    import platformdirs

    config = MonitorConfig(run="r")
    assert config.spool_dir == Path(platformdirs.user_cache_dir("gradwatch")) / "spool"
    assert config.spool_max_bytes == 256 * 2**20


@pytest.mark.parametrize("url", ["localhost:8000", "http://", "http://host:port", "127.0.0.1"])
def test_gradient_monitor_rejects_a_malformed_server_url(url, tmp_path):
    with pytest.raises(ConfigError, match=r"^server:"):
        GradientMonitor(run="r", server=url, spool_dir=str(tmp_path))


def test_gradient_monitor_rejects_an_unwritable_spool_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"^spool_dir: cannot write to the directory .*a-file"):
        GradientMonitor(run="r", server="http://127.0.0.1:9", spool_dir=str(blocker / "spool"))


def test_gradient_monitor_rejects_an_unwritable_local_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"^local_dir: cannot write to the directory"):
        GradientMonitor(run="r", local_dir=str(blocker))


def test_gradient_monitor_checks_the_spool_dir_only_with_a_server(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monitor = GradientMonitor(run="r", local_dir=str(tmp_path / "runs"), spool_dir=str(blocker))
    monitor.close()
    with pytest.raises(ConfigError, match=r"^spool_dir:"):
        GradientMonitor(
            run="r", server="http://127.0.0.1:9", spool_dir=str(blocker), spool_max_bytes=1
        )
    off = GradientMonitor(
        run="r", server="http://127.0.0.1:9", spool_dir=str(blocker), spool_max_bytes=0
    )
    assert off.sender.spool is None
    off.close(timeout_seconds=0.01)
