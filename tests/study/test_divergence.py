"""Divergence detection (server/study/divergence.py) on hand-made loss curves."""

from __future__ import annotations

import math

import pytest

from gradwatch.server.study.divergence import find_divergence


def _steps(losses):
    return list(range(len(losses)))


def test_divergence_none_for_a_falling_loss():
    losses = [1.0 / (1 + 0.1 * i) for i in range(100)]
    assert find_divergence(_steps(losses), losses) is None


def test_divergence_at_the_first_nonfinite_loss():
    losses = [1.0, 0.9, 0.8, math.inf, math.nan]
    assert find_divergence([10, 11, 12, 13, 14], losses) == 13


def test_divergence_ignores_a_spike_that_recovers():
    losses = [1.0] * 30 + [1e6, 1e6] + [0.5] * 30
    assert find_divergence(_steps(losses), losses) is None


def test_divergence_when_the_loss_ends_far_above_its_start():
    losses = [1.0] * 40 + [50.0] * 60
    # The trailing median crosses 3 × 1.0 at step 44; the stretch began at step 40.
    assert find_divergence(_steps(losses), losses) == 40


def test_divergence_is_the_start_of_the_final_stretch():
    losses = [1.0] * 20 + [10.0] * 20 + [1.0] * 20 + [10.0] * 40
    assert find_divergence(_steps(losses), losses) == 60


def test_divergence_none_below_the_factor():
    losses = [1.0] * 20 + [2.5] * 80
    assert find_divergence(_steps(losses), losses) is None
    assert find_divergence(_steps(losses), losses, factor=2.0) == 20


def test_divergence_at_the_last_step_when_the_held_out_loss_blew_up():
    losses = [1.0] * 30 + [0.5] * 29 + [1e6]  # one bad last step: the median hides it
    assert find_divergence(_steps(losses), losses) is None
    assert find_divergence(_steps(losses), losses, final_loss=4e6) == 59
    assert find_divergence(_steps(losses), losses, final_loss=math.nan) == 59
    assert find_divergence(_steps(losses), losses, final_loss=0.4) is None


def test_divergence_of_an_empty_run_and_bad_arguments():
    assert find_divergence([], []) is None
    with pytest.raises(ValueError, match="steps"):
        find_divergence([1, 2], [1.0])
    with pytest.raises(ValueError, match="factor"):
        find_divergence([1], [1.0], factor=1.0)
