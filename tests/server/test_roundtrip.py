"""Property: every stored value, NaN and ±Inf included, comes back exactly via /series."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.wire import (
    create_run,
    decode_float,
    encode_float,
    get_series,
    make_batch,
    post_batch,
)

_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
_OPTIONAL_FLOAT32 = st.one_of(st.none(), _FLOAT32)


@st.composite
def _batches(draw):
    n = draw(st.integers(1, 12))
    width = draw(st.integers(1, 4))
    first = draw(st.integers(0, 10**12))
    gaps = draw(st.lists(st.integers(1, 3), min_size=n - 1, max_size=n - 1))
    steps = [first, *(first + sum(gaps[: i + 1]) for i in range(n - 1))]
    rows = st.lists(_FLOAT32, min_size=width, max_size=width)
    optional_rows = st.lists(_OPTIONAL_FLOAT32, min_size=width, max_size=width)
    return {
        "steps": steps,
        "layers": [f"block_{j}/dense" for j in range(width)],
        "loss": draw(st.lists(_OPTIONAL_FLOAT32, min_size=n, max_size=n)),
        "global_norm": draw(st.lists(_FLOAT32, min_size=n, max_size=n)),
        "grad_norm": draw(st.lists(rows, min_size=n, max_size=n)),
        "weight_norm": draw(st.lists(optional_rows, min_size=n, max_size=n)),
        "nonfinite": draw(
            st.lists(
                st.lists(st.integers(0, 2**53), min_size=width, max_size=width),
                min_size=n,
                max_size=n,
            )
        ),
    }


def _same(expected: float, returned: float | str) -> bool:
    value = decode_float(returned)
    assert value is not None
    if math.isnan(expected):
        return math.isnan(value)
    return value == expected and math.copysign(1, value) == math.copysign(1, expected)


def _present(values):
    return [(i, v) for i, v in enumerate(values) if v is not None]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=_batches())
def test_series_round_trip_is_lossless(client, data):
    # One database per test; every example writes a run of its own.
    run_id = create_run(client)
    steps, layers = data["steps"], data["layers"]
    body = make_batch(
        steps,
        layers,
        grad_norm=data["grad_norm"],
        global_norm=data["global_norm"],
        nonfinite=data["nonfinite"],
        loss=[encode_float(v) for v in data["loss"]],
        weight_norm=[[encode_float(v) for v in row] for row in data["weight_norm"]],
    )
    assert post_batch(client, run_id, body).status_code == 200

    series = get_series(client, run_id, "global_norm", max_points=10_000)
    assert series["step"] == steps
    assert all(map(_same, data["global_norm"], series["value"]))

    loss = get_series(client, run_id, "loss")
    expected_loss = _present(data["loss"])
    assert loss["step"] == [steps[i] for i, _ in expected_loss]
    assert all(_same(v, r) for (_, v), r in zip(expected_loss, loss["value"], strict=True))

    for j, layer in enumerate(layers):
        grad = get_series(client, run_id, "grad_norm", layer=layer)
        assert grad["step"] == steps
        assert all(
            _same(row[j], r) for row, r in zip(data["grad_norm"], grad["value"], strict=True)
        )

        counts = get_series(client, run_id, "nonfinite", layer=layer)
        assert counts["value"] == [row[j] for row in data["nonfinite"]]

        weight = get_series(client, run_id, "weight_norm", layer=layer)
        expected = _present([row[j] for row in data["weight_norm"]])
        assert weight["step"] == [steps[i] for i, _ in expected]
        assert all(_same(v, r) for (_, v), r in zip(expected, weight["value"], strict=True))

    finite = np.asarray(data["global_norm"], dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    max_norm = client.get(f"/api/v1/runs/{run_id}").json()["max_global_norm"]
    if finite.size:
        assert decode_float(max_norm) == finite.max()
    else:
        assert max_norm == "NaN"
