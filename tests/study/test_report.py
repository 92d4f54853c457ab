"""The report's pieces on hand-made studies: JSON round trip, SVG charts, HTML page, table,
and the parsing of the command's options and of ``--model``."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch.server.study.page import render_page
from gradwatch.server.study.plan import OPTIMIZERS, PlanError, parse_names, parse_rates
from gradwatch.server.study.problem import BUILT_IN, ProblemError, Task, load_problem
from gradwatch.server.study.result import study_from_json, study_to_json, write_json
from gradwatch.server.study.svg import Line, line_chart
from gradwatch.server.study.table import format_row

from .handmade import typical


def test_result_json_is_strict_and_round_trips(tmp_path):
    study = typical()
    path = write_json(study, tmp_path / "study.json")
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["cells"][4]["final_loss"] == "NaN"
    assert data["cells"][4]["curve"]["global_norm"][-1] == "Infinity"
    back = study_from_json(data)
    assert back.thresholds == study.thresholds
    assert back.cells[4].diverged_at == 12
    assert math.isnan(back.cells[4].final_loss)
    assert study_to_json(back) == study_to_json(study)


def test_svg_breaks_lines_at_nonfinite_values_and_marks_them():
    svg = line_chart(
        "norms",
        [Line("a", "#000", [0, 1, 2, 3, 4], [1.0, 10.0, math.nan, 100.0, 1000.0])],
        max_step=10,
    )
    assert svg.startswith("<svg")
    assert svg.endswith("</svg>")
    assert svg.count("<polyline") == 2
    assert "non-finite from step 2" in svg
    assert ">1e0<" in svg
    assert ">1e3<" in svg


def test_svg_log_axis_skips_zero_and_linear_axis_draws_it():
    values = [0.0, 1.0, 2.0]
    assert line_chart("t", [Line("a", "#000", [0, 1, 2], values)]).count("<polyline") == 1
    linear = line_chart("t", [Line("a", "#000", [0, 1, 2], values)], log_y=False)
    assert linear.count("<polyline") == 1
    assert linear.count(",") >= 3


def test_svg_reduces_long_series_keeping_spikes():
    steps = list(range(10_000))
    values = [1.0] * 10_000
    values[5_003] = 1e6
    svg = line_chart("t", [Line("a", "#000", steps, values)], max_points=100)
    (points,) = [p for p in svg.split('points="')[1:]]
    assert len(points.split('"')[0].split()) == 100
    assert ">1e6<" in svg


def test_page_holds_the_summary_table_and_curves_and_loads_nothing():
    page = render_page(typical())
    assert page.count("<tr class=") == 16
    assert page.count('<section class="curves"') == 4
    assert page.count("<svg") == 8
    assert "A sentence." in page
    assert "http://127.0.0.1:1/compare?runs=a,b" in page
    assert "<script" not in page
    assert "src=" not in page
    assert "@import" not in page


def test_table_row_of_a_diverged_and_a_clipped_cell():
    study = typical()
    assert format_row(study.cells[4]) == (
        "SGD",
        "high 0.1",
        "none",
        "nan",
        "step 12",
        "0/50",
        "0/50",
        "×1.00",
    )
    assert format_row(study.cells[6])[3:6] == ("0.08", "no", "7/50")


def test_plan_parses_lists_and_rates():
    assert parse_names("adam, sgd,adam", OPTIMIZERS, "--optimizers") == ("adam", "sgd")
    with pytest.raises(PlanError, match="--optimizers"):
        parse_names("adam,lion", OPTIMIZERS, "--optimizers")
    with pytest.raises(PlanError, match="--optimizers"):
        parse_names(" , ", OPTIMIZERS, "--optimizers")
    rates = parse_rates("sgd=0.02:0.2, adam=1e-4:1e-2", BUILT_IN["rnn"].rates)
    assert rates["sgd"] == (0.02, 0.2)
    assert rates["adam"] == (1e-4, 1e-2)
    assert rates["rmsprop"] == BUILT_IN["rnn"].rates["rmsprop"]
    for bad in ("sgd=0.1", "lion=0.1:1", "sgd=0.2:0.1", "sgd=x:1", "sgd=-1:1"):
        with pytest.raises(PlanError, match="--rates"):
            parse_rates(bad, BUILT_IN["rnn"].rates)


def test_problem_loads_a_users_function_and_checks_its_contract():
    problem = load_problem("rnn", "tests.study.tiny_model:build")
    assert problem.name == "tests.study.tiny_model:build"
    task = problem.build(0)
    assert isinstance(task, Task)
    assert task.batch_size == 16
    assert task.loss == "mse"
    assert task.x_val is task.x  # no held-out data given: the training data
    with pytest.raises(ProblemError, match="not a Task or a mapping"):
        load_problem("rnn", "tests.study.tiny_model:not_a_task").build(0)
    with pytest.raises(ProblemError, match="without x, y"):
        load_problem("rnn", "tests.study.tiny_model:without_data").build(0)
    for spec, message in [
        ("tests.study.tiny_model", "module:function"),
        ("tests.study.nowhere:build", "cannot import"),
        ("tests.study.tiny_model:absent", "no function"),
    ]:
        with pytest.raises(ProblemError, match=message):
            load_problem("rnn", spec)
    with pytest.raises(ProblemError, match="--problem"):
        load_problem("cnn", None)
