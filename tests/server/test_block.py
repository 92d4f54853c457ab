"""Block codec: packing rules and lossless decode (pure NumPy, no database)."""

from __future__ import annotations

import numpy as np

from gradwatch.server.store.block import StoredBlock, decode_blocks, encode_blocks
from gradwatch.server.store.metric import MetricKind


def _stored(blocks, j):
    return StoredBlock(
        first_step=int(blocks.first_step[j]),
        last_step=int(blocks.last_step[j]),
        count=int(blocks.count[j]),
        vmin=None if np.isnan(blocks.vmin[j]) else float(blocks.vmin[j]),
        steps=blocks.steps[j],
        values=blocks.values[j],
    )


def test_block_constant_and_contiguous_columns_cost_no_bytes():
    steps = np.arange(10, 20, dtype=np.int64)
    values = np.zeros((10, 3), dtype=np.int64)
    values[4, 2] = 7

    blocks = encode_blocks(steps, values, None, MetricKind.COUNT)

    assert blocks.steps == [None, None, None]
    assert blocks.values[:2] == [None, None]
    assert np.frombuffer(blocks.values[2], dtype="<i8").tolist() == values[:, 2].tolist()
    assert blocks.vsum.tolist() == [0.0, 0.0, 7.0]
    assert blocks.vmax.tolist() == [0.0, 0.0, 7.0]


def test_block_summaries_ignore_nan_and_keep_infinity():
    steps = np.array([1, 2, 3], dtype=np.int64)
    values = np.array(
        [[np.nan, 1.0, np.inf], [np.nan, np.nan, -np.inf], [np.nan, 3.0, 2.0]], dtype=np.float32
    )

    blocks = encode_blocks(steps, values, None, MetricKind.FLOAT)

    assert blocks.nan_count.tolist() == [3, 1, 0]
    assert np.isnan(blocks.vmin[0])
    assert np.isnan(blocks.vmax[0])
    assert blocks.vmin[1:].tolist() == [1.0, -np.inf]
    assert blocks.vmax[1:].tolist() == [3.0, np.inf]
    assert blocks.vsum[0] == 0.0
    assert blocks.vsum[1] == 4.0
    assert np.isnan(blocks.vsum[2])
    assert np.isnan(blocks.vlast[0])
    assert blocks.vlast[1:].tolist() == [3.0, 2.0]


def test_block_absent_values_leave_gaps_in_steps():
    steps = np.array([5, 6, 7, 8], dtype=np.int64)
    values = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]], dtype=np.float32)
    present = np.array([[True, False], [False, False], [True, False], [True, False]])

    blocks = encode_blocks(steps, values, present, MetricKind.FLOAT)
    decoded_steps, decoded_values = decode_blocks([_stored(blocks, 0)], MetricKind.FLOAT)

    assert blocks.count.tolist() == [3, 0]
    assert blocks.first_step[0] == 5
    assert blocks.last_step[0] == 8
    assert decoded_steps.tolist() == [5, 7, 8]
    assert decoded_values.tolist() == [1.0, 3.0, 4.0]


def test_block_decode_concatenates_mixed_blocks_losslessly():
    rng = np.random.default_rng(3)
    columns = []
    expected_steps, expected_values = [], []
    for first, n, sparse, constant in [
        (0, 4, False, True),
        (10, 5, True, False),
        (40, 3, False, False),
    ]:
        steps = first + (np.arange(n) * (2 if sparse else 1)).astype(np.int64)
        values = np.full((n, 1), -0.0 if not constant else 1.5, dtype=np.float32)
        if not constant:
            values[:, 0] = rng.standard_normal(n).astype(np.float32)
            values[1, 0] = np.nan
        blocks = encode_blocks(steps, values, None, MetricKind.FLOAT)
        columns.append(_stored(blocks, 0))
        expected_steps.extend(steps.tolist())
        expected_values.extend(values[:, 0].tolist())

    steps, values = decode_blocks(columns, MetricKind.FLOAT)

    assert columns[0].values is None
    assert columns[0].steps is None
    assert columns[1].steps is not None
    assert steps.tolist() == expected_steps
    np.testing.assert_array_equal(values, np.asarray(expected_values, dtype=np.float32))


def test_block_negative_zero_is_packed():
    steps = np.arange(3, dtype=np.int64)
    values = np.full((3, 1), -0.0, dtype=np.float32)

    blocks = encode_blocks(steps, values, None, MetricKind.FLOAT)
    _, decoded = decode_blocks([_stored(blocks, 0)], MetricKind.FLOAT)

    assert blocks.values[0] is not None
    assert np.signbit(decoded).all()


def test_block_decode_of_nothing_is_empty():
    steps, values = decode_blocks([], MetricKind.COUNT)
    assert steps.size == 0
    assert values.size == 0
