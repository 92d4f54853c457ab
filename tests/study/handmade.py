"""Hand-made studies for the unit tests (no training)."""

from __future__ import annotations

import math

from gradwatch.server.study.result import CellResult, Curve, StudyResult
from gradwatch.server.study.threshold import Thresholds

REMEDIES = ("none", "by_value", "global_norm", "zclip")


def cell(optimizer, remedy, rate, final_loss, diverged_at=None, relative_time=1.0, steps=50):
    curve_steps = tuple(range(steps))
    loss = tuple(1.0 / (1 + i) for i in curve_steps)
    norm = tuple(2.0 + (i % 5) for i in curve_steps)
    if diverged_at is not None:
        loss = tuple(math.nan if i >= diverged_at else v for i, v in enumerate(loss))
        norm = tuple(math.inf if i >= diverged_at else v for i, v in enumerate(norm))
    return CellResult(
        optimizer=optimizer,
        remedy=remedy,
        rate=rate,
        learning_rate=0.01 if rate == "low" else 0.1,
        run_id=f"{optimizer}-{remedy}-{rate}",
        run_name=f"study-test-{optimizer}-{rate}-{remedy}",
        policy=None if remedy == "none" else {"name": remedy},
        steps=steps,
        planned_steps=steps,
        final_loss=math.nan if diverged_at is not None else final_loss,
        diverged_at=diverged_at,
        clipped_steps=0 if remedy == "none" else 7,
        skipped_steps=0,
        seconds_per_step=0.01 * (relative_time or 1.0),
        relative_time=relative_time,
        curve=Curve(curve_steps, norm, loss),
    )


def study(cells, optimizers=("sgd", "adam"), remedies=REMEDIES):
    thresholds = Thresholds(5.0, 3.0, 0.1, 50.0, 10)
    return StudyResult(
        problem="test",
        description="hand-made",
        command="gradwatch study --problem test",
        seed=0,
        steps=50,
        optimizers=optimizers,
        remedies=remedies,
        rates={o: (0.01, 0.1) for o in optimizers},
        thresholds={o: thresholds for o in optimizers},
        cells=tuple(cells),
        summary=("A sentence.",),
        server="http://127.0.0.1:1",
        compare_urls={"sgd/high": "http://127.0.0.1:1/compare?runs=a,b"},
    )


def typical():
    """SGD explodes at the high rate without a remedy; Adam does not.

    by_value does not rescue SGD and breaks Adam; global_norm and zclip rescue SGD;
    at the low rate zclip costs accuracy with SGD and global_norm helps Adam.
    """
    return study(
        [
            cell("sgd", "none", "low", 0.10),
            cell("sgd", "by_value", "low", 0.105, relative_time=1.02),
            cell("sgd", "global_norm", "low", 0.095, relative_time=1.04),
            cell("sgd", "zclip", "low", 0.20, relative_time=1.10),
            cell("sgd", "none", "high", math.nan, diverged_at=12),
            cell("sgd", "by_value", "high", math.nan, diverged_at=30),
            cell("sgd", "global_norm", "high", 0.08),
            cell("sgd", "zclip", "high", 0.09),
            cell("adam", "none", "low", 0.05),
            cell("adam", "by_value", "low", 0.052, relative_time=1.06),
            cell("adam", "global_norm", "low", 0.03, relative_time=1.00),
            cell("adam", "zclip", "low", 0.05, relative_time=1.20),
            cell("adam", "none", "high", 0.30),
            cell("adam", "by_value", "high", math.nan, diverged_at=40),
            cell("adam", "global_norm", "high", 0.06),
            cell("adam", "zclip", "high", 0.31),
        ]
    )
