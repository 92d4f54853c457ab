"""Agent and server are pinned to one wire format: ``gradwatch.wire``.

The agent writes batches with :meth:`StepBatch.to_wire`; the server reads them with its
pydantic ``StepBatch``. Both must agree with the field lists, schema version, step range
and non-finite spellings of ``gradwatch.wire``, and a batch the agent writes must read back
on the server with every float32 value (NaN and ±Inf included) unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch import wire
from gradwatch.agent.records import StepBatch as AgentBatch
from gradwatch.server.schemas import StepBatch as ServerBatch
from tests.fakes import step_batch

_ENVELOPE = {"schema", "batch_id", "layers", "step", "dropped_batches", "incidents"}
_INCIDENT = {
    "step": 1,
    "cause": "nonfinite",
    "path": "/runs/incidents/r/step-1",
    "host": "trainer",
    "bytes": 10,
    "format": "gradwatch-incident/1",
}


_FLOAT_MATRICES = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)
"""Steps × layers of float32 values, NaN and ±Inf included."""


def _full_agent_batch(values: np.ndarray, steps: np.ndarray) -> AgentBatch:
    n, width = values.shape
    known = np.ones(n, bool)
    return AgentBatch(
        layers=tuple(f"model/layer_{i}" for i in range(width)),
        step=steps,
        loss=values[:, 0].copy(),
        loss_known=known,
        global_norm=values[:, 0].copy(),
        global_norm_clipped=values[:, -1].copy(),
        clip_coef=np.ones(n, np.float32),
        skipped=np.zeros(n, bool),
        grad_norm=values,
        nonfinite=np.zeros((n, width), np.int64),
        weight_norm=values.copy(),
        update_ratio=values.copy(),
        weights_known=known,
        incidents=(_INCIDENT,),
    )


def test_wire_agent_writes_exactly_the_fields_the_module_lists():
    batch = _full_agent_batch(np.ones((2, 3), np.float32), np.arange(2, dtype=np.int64))
    written = set(batch.to_wire({"queue_full": 1}))
    assert written == _ENVELOPE | set(wire.RUN_FIELDS) | set(wire.LAYER_FIELDS)


def test_wire_server_reads_exactly_the_fields_the_module_lists():
    fields = {f.alias or name for name, f in ServerBatch.model_fields.items()}
    assert fields == _ENVELOPE | set(wire.RUN_FIELDS) | set(wire.LAYER_FIELDS)
    optional = {
        f.alias or name for name, f in ServerBatch.model_fields.items() if not f.is_required()
    }
    assert optional == set(wire.OPTIONAL_FIELDS) | {"dropped_batches", "incidents"}


def test_wire_schema_version_is_the_one_both_sides_use():
    assert step_batch().to_wire()["schema"] == wire.SCHEMA_VERSION
    assert ServerBatch.model_fields["schema_version"].annotation.__args__ == (wire.SCHEMA_VERSION,)


def test_wire_step_range_is_int64():
    body = step_batch().to_wire()
    assert ServerBatch.model_validate({**body, "step": [wire.MAX_STEP]}).step == [wire.MAX_STEP]
    with pytest.raises(ValueError, match="step"):
        ServerBatch.model_validate({**body, "step": [wire.MAX_STEP + 1]})


@given(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4028235e38]))
def test_wire_float_codec_round_trips(value):
    encoded = wire.encode_float(value)
    assert json.loads(json.dumps(encoded, allow_nan=False)) == encoded
    decoded = wire.decode_float(encoded)
    assert decoded == value or (math.isnan(decoded) and math.isnan(value))
    assert math.copysign(1, decoded) == math.copysign(1, value) or math.isnan(value)


@given(
    values=_FLOAT_MATRICES,
    first=st.integers(0, wire.MAX_STEP - 10),
)
def test_wire_agent_batch_reads_back_on_the_server_unchanged(values, first):
    steps = np.arange(first, first + len(values), dtype=np.int64)
    batch = _full_agent_batch(values, steps)
    text = json.dumps(batch.to_wire(), allow_nan=False)  # strict JSON, as sent
    parsed = ServerBatch.model_validate_json(text)
    assert parsed.step == steps.tolist()
    for name in ("grad_norm", "weight_norm", "update_ratio"):
        got = np.array(getattr(parsed, name), dtype=np.float64)
        assert np.array_equal(got, values.astype(np.float64), equal_nan=True), name
    loss = np.array(parsed.loss, dtype=np.float64)
    assert np.array_equal(loss, values[:, 0].astype(np.float64), equal_nan=True)


def _columns_equal(left, right) -> None:
    """Two ``BatchColumns`` hold the same batch, bit for bit (NaN payloads aside)."""
    assert (left.batch_id, left.layers) == (right.batch_id, right.layers)
    assert np.array_equal(left.steps, right.steps)
    assert left.metrics.keys() == right.metrics.keys()
    for metric, item in left.metrics.items():
        other = right.metrics[metric]
        assert (item is None) == (other is None), metric
        if item is None:
            continue
        assert item[0].dtype == other[0].dtype, metric
        assert np.array_equal(item[0], other[0], equal_nan=True), metric
        assert (item[1] is None) == (other[1] is None), metric
        if item[1] is not None:
            assert np.array_equal(item[1], other[1]), metric
    assert left.dropped_batches == right.dropped_batches
    assert left.incidents == right.incidents


@given(
    values=_FLOAT_MATRICES,
    first=st.integers(0, wire.MAX_STEP - 10),
    data=st.data(),
)
def test_wire_binary_body_reads_as_the_same_batch_as_its_json(values, first, data):
    """The agent's binary body and its JSON body make the same arrays on the server, with
    unmeasured values (JSON ``null``) in the same places."""
    from gradwatch.server.api.binary_batch import parse_binary_batch
    from gradwatch.server.ingest.columns import from_json

    n, width = values.shape
    steps = np.arange(first, first + n, dtype=np.int64)
    known = data.draw(hnp.arrays(np.bool_, n))
    counts = data.draw(hnp.arrays(np.int64, (n, width), elements=st.integers(0, wire.MAX_COUNT)))
    batch = dataclasses.replace(
        _full_agent_batch(values, steps),
        loss_known=data.draw(hnp.arrays(np.bool_, n)),
        weights_known=known,
        skipped=data.draw(hnp.arrays(np.bool_, n)),
        nonfinite=counts,
        dropped_batches=data.draw(st.sampled_from([None, {"queue_full": 3}])),
    )

    from_binary = parse_binary_batch(batch.to_binary())
    from_text = from_json(ServerBatch.model_validate_json(json.dumps(batch.to_wire())))

    _columns_equal(from_binary, from_text)
