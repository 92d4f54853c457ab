"""merge_group_batches: several groups' rows over the same steps become the run's batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gradwatch.agent import ConfigError
from gradwatch.agent.groups import GroupMerger, check_group_name, merge_group_batches
from gradwatch.agent.records import StepBatch


def _batch(layers, steps, norms, *, coef=1.0, skipped=False, nonfinite=0, loss=None):
    n = len(steps)
    norms = np.asarray(norms, np.float32).reshape(n, len(layers))
    global_norm = np.sqrt(np.sum(np.square(norms.astype(np.float64)), axis=1)).astype(np.float32)
    return StepBatch(
        layers=tuple(layers),
        step=np.asarray(steps, np.int64),
        loss=np.full(n, np.nan if loss is None else loss, np.float32),
        loss_known=np.full(n, loss is not None),
        global_norm=global_norm,
        global_norm_clipped=(global_norm * coef).astype(np.float32),
        clip_coef=np.full(n, coef, np.float32),
        skipped=np.full(n, skipped),
        grad_norm=norms,
        nonfinite=np.full((n, len(layers)), nonfinite, np.int64),
    )


def test_groups_at_the_same_steps_sit_side_by_side_with_a_quadrature_global_norm():
    d = _batch(["d/a", "d/b"], [0, 1], [[3, 0], [1, 1]], loss=2.0)
    g = _batch(["g/c"], [0, 1], [[4], [1]], coef=0.5)
    (merged,) = merge_group_batches([(d.layers, [d]), (g.layers, [g])])
    assert merged.layers == ("d/a", "d/b", "g/c")
    assert merged.step.tolist() == [0, 1]
    np.testing.assert_allclose(merged.grad_norm, [[3, 0, 4], [1, 1, 1]])
    np.testing.assert_allclose(merged.global_norm, [5.0, np.sqrt(3)], rtol=1e-6)
    # clipped: sqrt(3² + 2²) over 5 at step 0
    np.testing.assert_allclose(merged.clip_coef[0], np.sqrt(13) / 5, rtol=1e-6)
    assert merged.loss.tolist() == [2.0, 2.0]
    assert merged.loss_known.all()


def test_a_group_applied_twice_in_one_step_keeps_its_largest_norm_and_all_nonfinite_values():
    first = _batch(["g/c"], [0], [[2.0]], nonfinite=1)
    second = _batch(["g/c"], [0], [[np.nan]], nonfinite=3, skipped=True, coef=0.0)
    d = _batch(["d/a"], [0], [[1.0]])
    (merged,) = merge_group_batches([(d.layers, [d]), (first.layers, [first, second])])
    assert np.isnan(merged.grad_norm[0, 1])  # NaN wins: a non-finite apply is never hidden
    assert merged.nonfinite.tolist() == [[0, 4]]
    assert merged.skipped.tolist() == [True]


def test_steps_where_a_group_did_not_apply_carry_only_the_others_layers():
    d = _batch(["d/a"], [0, 1, 2, 3], [[1], [1], [1], [1]])
    g = _batch(["g/c"], [0, 1, 3], [[2], [2], [2]])
    merged = merge_group_batches([(d.layers, [d]), (g.layers, [g])])
    assert [(b.layers, b.step.tolist()) for b in merged] == [
        (("d/a", "g/c"), [0, 1]),
        (("d/a",), [2]),
        (("d/a", "g/c"), [3]),
    ]


def test_no_rows_from_any_group_is_no_batch():
    assert merge_group_batches([(("d/a",), []), (("g/c",), [])]) == []


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, 3, "gen erator"])
def test_group_names_that_cannot_prefix_a_layer_are_config_errors(name):
    with pytest.raises(ConfigError, match=r"^group: "):
        check_group_name(name)


def test_incident_announcements_of_any_group_ride_on_the_merged_batch():
    sent = []
    merger = GroupMerger(sent.append)
    note = {"step": 1, "cause": "nonfinite", "path": "/b/step-1", "host": "h", "bytes": 1}
    d = _batch(["d/a"], [0, 1], [[1], [1]])
    g = dataclasses.replace(_batch(["g/c"], [0, 1], [[2], [np.nan]]), incidents=(note,))
    merger.collector(0)(d)
    merger.collector(1)(g)
    merger.flush([d.layers, g.layers])
    (merged,) = sent
    assert merged.incidents == (note,)
    merger.flush([d.layers, g.layers])  # nothing pending: nothing sent, nothing repeated
    assert len(sent) == 1
