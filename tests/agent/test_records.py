"""StepBatch ↔ wire dict: lossless for float32 values, NaN and ±Inf included."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.agent.records import StepBatch, decode_floats, encode_floats

_floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def _batch(n: int, layers: int, values: np.ndarray, losses: np.ndarray, known: np.ndarray):
    return StepBatch(
        layers=tuple(f"layer_{i}" for i in range(layers)),
        step=np.arange(100, 100 + n, dtype=np.int64),
        loss=losses,
        loss_known=known,
        global_norm=values[:, 0].copy(),
        global_norm_clipped=values[:, 0].copy(),
        clip_coef=np.ones(n, np.float32),
        skipped=np.zeros(n, bool),
        grad_norm=values,
        nonfinite=np.zeros((n, layers), np.int64),
    )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True)) and a.dtype == b.dtype


@given(
    data=st.data(),
    n=st.integers(1, 8),
    layers=st.integers(1, 5),
)
def test_step_batch_wire_round_trip_is_lossless(data, n, layers):
    values = data.draw(hnp.arrays(np.float32, (n, layers), elements=_floats32))
    losses = data.draw(hnp.arrays(np.float32, (n,), elements=_floats32))
    known = data.draw(hnp.arrays(np.bool_, (n,)))
    batch = _batch(n, layers, values, losses, known)
    # Through real JSON text, as on the wire; JSON itself must stay strict.
    wire = json.loads(json.dumps(batch.to_wire(), allow_nan=False))
    back = StepBatch.from_wire(wire)
    assert _same(back.grad_norm, batch.grad_norm)
    assert _same(back.global_norm, batch.global_norm)
    assert np.array_equal(back.step, batch.step)
    assert np.array_equal(back.loss_known, known if known.any() else np.zeros(n, bool))
    assert _same(back.loss[back.loss_known], losses[back.loss_known])
    assert back.batch_id == batch.batch_id


def test_encode_floats_uses_protobuf_json_spellings():
    encoded = encode_floats(np.array([1.5, np.nan, np.inf, -np.inf], np.float32))
    assert encoded == [1.5, "NaN", "Infinity", "-Infinity"]


def test_encode_floats_marks_unknown_values_null():
    encoded = encode_floats(np.array([1.0, 2.0], np.float32), np.array([True, False]))
    assert encoded == [1.0, None]


def test_decode_floats_rejects_other_strings():
    with pytest.raises(ValueError, match="'nan'"):
        decode_floats([1.0, "nan"])


def test_step_batch_rejects_steps_that_do_not_increase():
    values = np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match="step"):
        StepBatch(
            layers=("a",),
            step=np.array([5, 5]),
            loss=np.zeros(2, np.float32),
            loss_known=np.zeros(2, bool),
            global_norm=values[:, 0],
            global_norm_clipped=values[:, 0],
            clip_coef=values[:, 0],
            skipped=np.zeros(2, bool),
            grad_norm=values,
            nonfinite=np.zeros((2, 1), np.int64),
        )


def test_step_batch_to_wire_carries_drop_counts_and_omits_unknown_loss():
    batch = _batch(1, 1, np.ones((1, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, bool))
    wire = batch.to_wire({"queue_full": 3})
    assert wire["dropped_batches"] == {"queue_full": 3}
    assert "loss" not in wire
    assert wire["schema"] == 1
    assert not math.isnan(wire["grad_norm"][0][0])


@given(
    data=st.data(),
    n=st.integers(1, 8),
    layers=st.integers(1, 5),
)
def test_weight_statistics_round_trip_with_null_rows_where_not_measured(data, n, layers):
    values = data.draw(hnp.arrays(np.float32, (n, layers), elements=_floats32))
    ratios = data.draw(hnp.arrays(np.float32, (n, layers), elements=_floats32))
    known = data.draw(hnp.arrays(np.bool_, (n,)))
    plain = _batch(n, layers, values, values[:, 0].copy(), np.ones(n, bool))
    batch = dataclasses.replace(plain, weight_norm=values, update_ratio=ratios, weights_known=known)
    wire = json.loads(json.dumps(batch.to_wire(), allow_nan=False))
    if not known.any():
        assert "weight_norm" not in wire
        assert "update_ratio" not in wire
        return
    assert [row == [None] * layers for row in wire["weight_norm"]] == (~known).tolist()
    back = StepBatch.from_wire(wire)
    assert np.array_equal(back.weights_known, known)
    assert _same(back.weight_norm[known], values[known])
    assert _same(back.update_ratio[known], ratios[known])


def test_step_batch_wants_all_weight_fields_or_none():
    batch = _batch(2, 1, np.ones((2, 1), np.float32), np.zeros(2, np.float32), np.ones(2, bool))
    with pytest.raises(ValueError, match="all three or none"):
        dataclasses.replace(batch, weight_norm=np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="update_ratio"):
        dataclasses.replace(
            batch,
            weight_norm=np.ones((2, 1), np.float32),
            update_ratio=np.ones((3, 1), np.float32),
            weights_known=np.ones(2, bool),
        )


def test_incident_announcements_travel_with_the_batch_and_come_back():
    batch = _batch(2, 1, np.ones((2, 1), np.float32), np.zeros(2, np.float32), np.ones(2, bool))
    assert "incidents" not in batch.to_wire()
    note = {"step": 1, "cause": "nonfinite", "path": "/x/step-1", "host": "h", "bytes": 3}
    announced = dataclasses.replace(batch, incidents=(note,))
    wire = json.loads(json.dumps(announced.to_wire(), allow_nan=False))
    assert wire["incidents"] == [note]
    assert StepBatch.from_wire(wire).incidents == (note,)
