"""The read commands' pure parts: sparkline, numbers, the check's judgement, help placeholders."""

from __future__ import annotations

import re

import pytest

from gradwatch.server.cli import build_command
from gradwatch.server.cli.check import FailOn, judge
from gradwatch.server.cli.client import check_server_url
from gradwatch.server.cli.exits import CliError, ExitCode
from gradwatch.server.cli.format import INF_MARK, NAN_MARK, format_number, sparkline


def _raw(values):
    return {"downsampled": False, "step": list(range(len(values))), "value": values}


def test_sparkline_marks_inf_and_nan_and_uses_a_log_scale():
    line = sparkline(_raw([1.0, 10.0, 100.0, "Infinity", "NaN", 1000.0]))

    assert line is not None
    assert line.text.plain == f"▁▃▆{INF_MARK}{NAN_MARK}█"
    assert line.log_scale
    assert (line.low, line.high) == (1.0, 1000.0)
    assert (line.first_step, line.last_step, line.steps_per_cell) == (0, 5, 1)


def test_sparkline_of_buckets_draws_the_bucket_max():
    series = {
        "downsampled": True,
        "bucket_width": 10,
        "step": [0, 10, 20],
        "min": [1.0, 1.0, 1.0],
        "max": [1.0, 1e6, 1.0],
        "last": [1.0, 1.0, 1.0],
        "count": [10, 10, 10],
    }

    line = sparkline(series)

    assert line is not None
    assert line.text.plain == "▁█▁"
    assert (line.first_step, line.last_step, line.steps_per_cell) == (0, 29, 10)


def test_sparkline_linear_with_zeros_flat_when_constant_none_when_empty():
    assert sparkline(_raw([0.0, 1.0])).text.plain == "▁█"  # type: ignore[union-attr]
    assert not sparkline(_raw([0.0, 1.0])).log_scale  # type: ignore[union-attr]
    assert sparkline(_raw([2.0, 2.0, 2.0])).text.plain == "▁▁▁"  # type: ignore[union-attr]
    assert sparkline(_raw(["NaN"])).text.plain == NAN_MARK  # type: ignore[union-attr]
    assert sparkline(_raw([])) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (3, "3"), (0.5, "0.5"), (1234567.0, "1.235e+06"), ("NaN", "NaN"),
     ("Infinity", "inf"), ("-Infinity", "-inf")],
)  # fmt: skip
def test_format_number(value, text):
    assert format_number(value) == text


def _health(verdict, **detections):
    return {
        "verdict": verdict,
        "detections": {rule: {"warning": 0, "critical": n} for rule, n in detections.items()},
        "last_event": None,
    }


def _run(steps=100, max_norm=1.0):
    return {"num_steps": steps, "max_global_norm": max_norm}


def _judge(run, health, **options):
    settings = {
        "fail_on": FailOn.CRITICAL,
        "max_global_norm": None,
        "no_data_fails": False,
        "recent_steps": 1000,
        **options,
    }
    return judge(run, health, **settings)


def test_judge_uses_the_recent_verdict_or_every_detection_of_the_run():
    recovered = _health("healthy", explosion=3)

    assert _judge(_run(), recovered)[0] == []
    [reason] = _judge(_run(), recovered, recent_steps=None)[0]
    assert reason.startswith("health critical in the run; detections so far: explosion 3")


def test_judge_max_global_norm_fails_on_larger_and_nan():
    assert _judge(_run(max_norm=5.0), _health("healthy"), max_global_norm=10.0)[0] == []
    assert _judge(_run(max_norm="Infinity"), _health("healthy"), max_global_norm=10.0)[0]
    assert _judge(_run(max_norm="NaN"), _health("healthy"), max_global_norm=10.0)[0]


def test_judge_without_data():
    assert _judge(_run(steps=0, max_norm=None), _health("healthy"))[0] == []
    assert _judge(_run(steps=0, max_norm=None), _health("healthy"), no_data_fails=True)[0]


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host", "http://", "not a url"])
def test_bad_server_urls_are_usage_errors(url):
    with pytest.raises(CliError) as raised:
        check_server_url(url)
    assert raised.value.exit_code == ExitCode.USAGE


def test_server_url_loses_its_trailing_slash():
    assert check_server_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_server_url("https://gw.example/base/") == "https://gw.example/base"


def _command_paths(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_help_shows_real_placeholders_everywhere(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    command = build_command()
    paths = list(_command_paths(command))
    assert {("runs",), ("show",), ("check",), ("open",), ("db", "upgrade")} <= set(paths)

    for path in paths:
        with pytest.raises(SystemExit) as exited:
            build_command().main([*path, "--help"], prog_name="gradwatch")
        assert exited.value.code == 0
        text = capsys.readouterr().out
        placeholders = re.findall(r"<(?:str|int|float|bool|list\[str\])>|\bTEXT\b", text)
        assert placeholders == [], (path, text)
        assert "--help" in text
