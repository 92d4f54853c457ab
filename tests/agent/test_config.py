"""Bad configuration raises at construction, naming the argument."""

from __future__ import annotations

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
        ({"queue_size": -1}, "queue_size"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds"),
        ({"retry_deadline_seconds": float("inf")}, "retry_deadline_seconds"),
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


def test_gradient_monitor_rejects_non_policy(tmp_path):
    with pytest.raises(ConfigError, match=r"^policy:"):
        GradientMonitor(run="r", policy=1.0, local_dir=str(tmp_path))  # type: ignore[arg-type]
