"""The generated summary (server/study/summary.py) on hand-made studies."""

from __future__ import annotations

import math

from gradwatch.server.study.summary import summarise

from .handmade import cell, study, typical


def _sentence(summary, start):
    (found,) = [s for s in summary if s.startswith(start)]
    return found


def test_summary_names_who_diverged_without_a_remedy():
    summary = summarise(typical())
    assert (
        _sentence(summary, "At the high rate without a remedy")
        == "At the high rate without a remedy SGD (step 12) diverged; Adam stayed stable on "
        "its own."
    )


def test_summary_says_which_remedies_kept_the_high_rate_stable():
    summary = summarise(typical())
    assert _sentence(summary, "Kept training stable") == (
        "Kept training stable at the high rate where SGD diverged without a remedy: "
        "global_norm and zclip."
    )
    assert _sentence(summary, "Did not prevent") == "Did not prevent the divergence: by_value."
    assert _sentence(summary, "Diverged at the high rate where no remedy did not") == (
        "Diverged at the high rate where no remedy did not: by_value (Adam (step 40))."
    )


def test_summary_says_which_remedies_cost_accuracy_at_the_low_rate():
    summary = summarise(typical())
    assert _sentence(summary, "Cost accuracy at the low rate") == (
        "Cost accuracy at the low rate (held-out loss more than 10% above the unclipped "
        "run's): zclip (SGD 0.2 vs 0.1)."
    )
    assert _sentence(summary, "Lowered the held-out loss") == (
        "Lowered the held-out loss at the low rate by more than 10%: global_norm (Adam 0.03 "
        "vs 0.05)."
    )
    assert _sentence(summary, "Within 10%") == (
        "Within 10% of the unclipped run at the low rate: by_value."
    )


def test_summary_names_the_best_high_rate_run_and_the_time_cost():
    summary = summarise(typical())
    assert _sentence(summary, "Lowest held-out loss") == (
        "Lowest held-out loss at the high rate: Adam with global_norm (0.06); without a "
        "remedy Adam (0.3)."
    )
    assert _sentence(summary, "Wall time per step") == (
        "Wall time per step against no remedy (median over its cells): by_value ×1.01, "
        "global_norm ×1.00 and zclip ×1.05."
    )


def test_summary_says_when_the_high_rate_never_matches_the_low_one():
    summary = summarise(typical())
    assert _sentence(summary, "No run at the high rate") == (
        "No run at the high rate came within 10% of the best at the low rate (Adam with "
        "global_norm, 0.03): a remedy that keeps a run from blowing up does not make its "
        "learning rate a good one."
    )
    close = study([cell("sgd", "none", "low", 0.1), cell("sgd", "zclip", "high", 0.105)])
    assert not [s for s in summarise(close) if s.startswith("No run at the high rate")]


def test_summary_when_every_optimizer_diverges_and_some_runs_survive():
    cells = [
        cell("sgd", "none", "high", math.nan, diverged_at=3),
        cell("adam", "none", "high", math.nan, diverged_at=1),
        cell("sgd", "zclip", "high", 0.2),
        cell("adam", "zclip", "high", math.nan, diverged_at=1),
    ]
    summary = summarise(study(cells, remedies=("none", "zclip")))
    assert summary[0] == (
        "At the high rate without a remedy every optimizer diverged: SGD (step 3) and Adam "
        "(step 1)."
    )
    assert _sentence(summary, "Kept only some") == (
        "Kept only some of those runs stable: zclip (still diverged: Adam (step 1))."
    )


def test_summary_when_nothing_diverges_or_everything_does():
    calm = study([cell("sgd", "none", "high", 0.1)], optimizers=("sgd",), remedies=("none",))
    assert summarise(calm)[0] == "At the high rate without a remedy no optimizer diverged (SGD)."
    lost = study(
        [cell("sgd", "none", "high", math.nan, diverged_at=2)],
        optimizers=("sgd",),
        remedies=("none",),
    )
    assert "At the high rate every run diverged or ended without a finite loss." in summarise(lost)
