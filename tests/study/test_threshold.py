"""The threshold rule (server/study/threshold.py) on hand-made warm-up norms."""

from __future__ import annotations

import math

import pytest

from gradwatch.server.study.threshold import VALUE_FACTOR, choose_thresholds


def test_threshold_global_norm_is_the_median_of_the_warmup():
    thresholds = choose_thresholds([1.0, 2.0, 3.0, 4.0, 100.0], {}, num_parameters=100)
    assert thresholds.global_norm == 3.0
    assert thresholds.percentile == 50.0
    assert thresholds.warmup_steps == 5


def test_threshold_by_norm_is_the_largest_layers_median():
    layers = {"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0], "c": [0.1, 0.1, 0.1]}
    thresholds = choose_thresholds([5.0, 5.0, 5.0], layers, num_parameters=4)
    assert thresholds.tensor_norm == 20.0


def test_threshold_by_value_is_three_rms_elements_of_a_typical_step():
    thresholds = choose_thresholds([8.0, 8.0], {}, num_parameters=16)
    assert thresholds.value == pytest.approx(VALUE_FACTOR * 8.0 / 4.0)
    # Without per-layer norms the global limit bounds every tensor.
    assert thresholds.tensor_norm == 8.0


def test_threshold_ignores_nonfinite_and_zero_norms():
    norms = [math.nan, math.inf, 0.0, 2.0, 4.0]
    thresholds = choose_thresholds(norms, {"a": [math.nan, 6.0]}, num_parameters=1)
    assert thresholds.global_norm == 3.0
    assert thresholds.tensor_norm == 6.0
    assert thresholds.warmup_steps == 2


def test_threshold_percentile_interpolates_like_numpy():
    thresholds = choose_thresholds([1.0, 2.0, 3.0, 4.0, 5.0], {}, 1, percentile=90.0)
    assert thresholds.global_norm == pytest.approx(4.6)


@pytest.mark.parametrize(
    ("norms", "parameters", "percentile"),
    [([math.nan, 0.0], 10, 50.0), ([1.0], 0, 50.0), ([1.0], 10, 0.0), ([1.0], 10, 101.0)],
)
def test_threshold_refuses_what_gives_no_limit(norms, parameters, percentile):
    with pytest.raises(ValueError):  # noqa: PT011
        choose_thresholds(norms, {}, parameters, percentile)
