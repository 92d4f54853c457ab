"""In-graph norms against float64 NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.agent.layers import LayerLayout, layout_of
from gradwatch.agent.stats import compute_gradient_stats, layer_norms_two_pass, sum_of_squares

LAYOUT = LayerLayout(names=("a", "b"), segment_ids=(0, 0, 1))


def _ref_norm(*arrays: np.ndarray) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a.astype(np.float64)))) for a in arrays))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        hnp.arrays(
            np.float32,
            st.integers(1, 20),
            elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
        ),
        min_size=3,
        max_size=3,
    )
)
def test_compute_gradient_stats_matches_float64_reference(grads):
    stats = compute_gradient_stats([tf.constant(g) for g in grads], LAYOUT)
    np.testing.assert_allclose(
        stats.layer_norms.numpy(), [_ref_norm(grads[0], grads[1]), _ref_norm(grads[2])], rtol=1e-5
    )
    np.testing.assert_allclose(stats.global_norm.numpy(), _ref_norm(*grads), rtol=1e-5)
    assert stats.layer_nonfinite.numpy().tolist() == [0, 0]


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-35])
def test_compute_gradient_stats_survives_overflow_and_underflow(scale):
    # Squares of 1e30 overflow float32 and squares of 1e-30 underflow it. (Subnormal
    # inputs, below 1.2e-38, are flushed to zero by TensorFlow's CPU kernels themselves.)
    base = np.linspace(0.5, 2.0, 64).astype(np.float32)
    big = (base.astype(np.float64) * scale).astype(np.float32)
    stats = compute_gradient_stats([tf.constant(big)], LayerLayout(("a",), (0,)))
    assert stats.global_norm.numpy() == pytest.approx(_ref_norm(big), rel=1e-5)
    assert stats.layer_nonfinite.numpy().tolist() == [0]


def test_compute_gradient_stats_counts_nonfinite_and_propagates_nan_over_inf():
    grads = [tf.constant([1.0, np.inf]), tf.constant([np.nan, np.nan, 3.0]), tf.constant([4.0])]
    stats = compute_gradient_stats(grads, LAYOUT)
    assert np.isnan(stats.layer_norms.numpy()[0])
    assert stats.layer_norms.numpy()[1] == pytest.approx(4.0)
    assert stats.layer_nonfinite.numpy().tolist() == [3, 0]
    assert np.isnan(stats.global_norm.numpy())
    inf_only = compute_gradient_stats([tf.constant([1.0, -np.inf])], LayerLayout(("a",), (0,)))
    assert inf_only.global_norm.numpy() == np.inf


def test_compute_gradient_stats_accumulates_half_precision_in_float32():
    g = np.full(4096, 300.0, np.float16)  # sum of squares 3.7e8 overflows float16
    stats = compute_gradient_stats([tf.constant(g)], LayerLayout(("a",), (0,)))
    assert stats.global_norm.dtype == tf.float32
    assert stats.global_norm.numpy() == pytest.approx(300.0 * 64.0, rel=1e-5)


def test_compute_gradient_stats_merges_duplicate_indexed_slices():
    # Rows 0 and 0 again: the true gradient row is their sum, [2, 2], norm sqrt(8),
    # not sqrt(1+1+1+1) = 2 as squaring the raw values would give.
    slices = tf.IndexedSlices(
        tf.constant([[1.0, 1.0], [1.0, 1.0]]), tf.constant([0, 0]), tf.constant([5, 2])
    )
    stats = compute_gradient_stats([slices], LayerLayout(("emb",), (0,)))
    assert stats.global_norm.numpy() == pytest.approx(math.sqrt(8.0))


def test_compute_gradient_stats_treats_missing_gradient_as_zero():
    stats = compute_gradient_stats([None, tf.constant([3.0, 4.0]), None], LAYOUT)
    np.testing.assert_allclose(stats.layer_norms.numpy(), [5.0, 0.0])


def test_layout_of_groups_by_owner_path():
    class V:
        def __init__(self, path):
            self.path = path

    layout = layout_of(
        [V("m/dense/kernel"), V("m/dense/bias"), V("m/sub/mha/query/kernel"), V("free")]
    )
    assert layout.names == ("m/dense", "m/sub/mha/query", "free")
    assert layout.segment_ids == (0, 0, 1, 2)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("shape", [(), (7,), (350, 350), (350, 1), (3, 4, 64), (5, 7)])
def test_sum_of_squares_matches_float64_in_every_compiler(mode, shape):
    # Graph mode sums by L2Loss, XLA by a matrix-vector product where the last
    # axis is 8 or longer: each must give the float64 sum to float32 rounding.
    x = np.random.default_rng(len(shape)).normal(size=shape).astype(np.float32)

    def ssq(t):
        return sum_of_squares(t)

    fn = {"eager": ssq, "graph": tf.function(ssq), "xla": tf.function(ssq, jit_compile=True)}
    got = float(fn[mode](tf.constant(x)))
    assert got == pytest.approx(float(np.sum(np.square(x.astype(np.float64)))), rel=1e-5)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_careful_norms_of_many_tensors_match_float64_in_every_compiler(mode, scale):
    # Several tensors of different shapes, one empty, one with a NaN and an Inf: the careful
    # path (taken for non-finite or tiny sums) reduces them all in one flat vector, which
    # under XLA must keep static shapes.
    rng = np.random.default_rng(7)
    shapes = [(3, 4), (0,), (5,), (2, 2, 2), (0, 3), (7,)]
    grads = [(rng.normal(size=s) * scale).astype(np.float32) for s in shapes]
    poisoned = grads[2].copy()
    poisoned[[1, 3]] = [np.nan, np.inf]
    layout = LayerLayout(names=("a", "b", "c"), segment_ids=(0, 0, 1, 1, 2, 2))

    def stats_of(*tensors):
        stats = compute_gradient_stats(list(tensors), layout)
        return stats.layer_norms, stats.layer_nonfinite, stats.variable_norms

    fn = {
        "eager": stats_of,
        "graph": tf.function(stats_of),
        "xla": tf.function(stats_of, jit_compile=True),
    }[mode]
    layer_norms, nonfinite, variable_norms = fn(*(tf.constant(g) for g in grads))
    np.testing.assert_allclose(
        layer_norms.numpy(),
        [_ref_norm(*grads[0:2]), _ref_norm(*grads[2:4]), _ref_norm(*grads[4:6])],
        rtol=1e-5,
    )
    np.testing.assert_allclose(variable_norms.numpy(), [_ref_norm(g) for g in grads], rtol=1e-5)
    assert nonfinite.numpy().tolist() == [0, 0, 0]

    grads[2] = poisoned
    layer_norms, nonfinite, variable_norms = fn(*(tf.constant(g) for g in grads))
    assert np.isnan(layer_norms.numpy()[1])
    assert np.isnan(variable_norms.numpy()[2])
    assert layer_norms.numpy()[0] == pytest.approx(_ref_norm(*grads[0:2]), rel=1e-5)
    assert nonfinite.numpy().tolist() == [0, 2, 0]


def _ref_layer_norms(arrays: list[np.ndarray], segment_ids: tuple[int, ...], layers: int):
    """float64 norms per layer, NaN over +Inf, rounded to float32 (which may overflow to Inf)."""
    norms = []
    for layer in range(layers):
        values = [
            a.astype(np.float64).ravel()
            for a, s in zip(arrays, segment_ids, strict=True)
            if s == layer
        ]
        flat = np.concatenate(values) if values else np.zeros(0)
        if np.isnan(flat).any():
            norms.append(np.nan)
        elif np.isinf(flat).any():
            norms.append(np.inf)
        else:
            scale = np.abs(flat).max(initial=0.0) or 1.0
            norms.append(scale * math.sqrt(float(np.sum(np.square(flat / scale)))))
    with np.errstate(over="ignore"):
        return np.array(norms).astype(np.float32)


_SPECIALS = st.sampled_from([0.0, np.nan, np.inf, -np.inf, 3e38, -1e30, 1e-30, 2e-38])
_TWO_PASS_LAYOUT = LayerLayout(names=("a", "b", "c"), segment_ids=(0, 0, 1, 2))


@settings(max_examples=60)
@given(
    st.lists(
        hnp.arrays(
            np.float32,
            st.integers(0, 12),
            elements=st.one_of(
                st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
                st.floats(width=32, allow_subnormal=False, allow_nan=False, allow_infinity=False),
                _SPECIALS,
            ),
        ),
        min_size=4,
        max_size=4,
    )
)
def test_two_pass_layer_norms_match_float64_with_nan_inf_overflow_and_underflow(arrays):
    # The measurement between steps (stats.layer_norms_two_pass) must give what the
    # in-step statistics give: NaN over +Inf, true norms of values whose squares leave
    # the float32 range, 0 for a layer of zeros or of no values.
    got = layer_norms_two_pass([tf.constant(a) for a in arrays], _TWO_PASS_LAYOUT).numpy()
    want = _ref_layer_norms(arrays, _TWO_PASS_LAYOUT.segment_ids, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    in_step = compute_gradient_stats([tf.constant(a) for a in arrays], _TWO_PASS_LAYOUT)
    np.testing.assert_allclose(got, in_step.layer_norms.numpy(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_two_pass_layer_norms_match_float64_in_every_compiler(mode):
    # Traced into the measurement function (graph) and, with steps_per_execution > 1,
    # into the train step (XLA under jit_compile).
    rng = np.random.default_rng(3)
    arrays = [
        (rng.normal(size=s) * k).astype(np.float32)
        for s, k in [((3, 4), 1e30), ((0,), 1.0), ((5,), 1e-30), ((2, 2), 1.0)]
    ]
    arrays[3][0, 1] = np.inf
    compiled = tf.function(
        lambda *ts: layer_norms_two_pass(list(ts), _TWO_PASS_LAYOUT), jit_compile=mode == "xla"
    )
    got = compiled(*(tf.constant(a) for a in arrays)).numpy()
    np.testing.assert_allclose(got, _ref_layer_norms(arrays, (0, 0, 1, 2), 3), rtol=1e-5)
