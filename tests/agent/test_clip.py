"""Clip policies against their references, as properties, and at their edges.

Policies are applied eagerly here (the same tf ops the compiled step runs);
``test_clip_fit.py`` runs each of them through ``model.fit`` with and without XLA.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.agent import ConfigError, clip
from gradwatch.agent.clip import ClipContext, ClipResult, PolicyState
from gradwatch.agent.layers import LayerLayout
from gradwatch.agent.stats import compute_gradient_stats

STEP = tf.constant(0, tf.int64)
SCALAR_LAYOUT = LayerLayout(("net/dense",), (0,))


def _layout(n: int) -> LayerLayout:
    """The first variable is layer ``net/a``, the others form ``net/b``."""
    if n == 1:
        return LayerLayout(("net/a",), (0,))
    return LayerLayout(("net/a", "net/b"), (0,) + (1,) * (n - 1))


def _context(grads, layout, variables=(), skipped=None) -> ClipContext:
    return ClipContext(
        compute_gradient_stats(grads, layout), list(variables), layout, STEP, skipped
    )


def _apply(policy, grads, layout=None, variables=(), state=None) -> tuple[ClipResult, PolicyState]:
    grads = [g if g is None or isinstance(g, tf.IndexedSlices) else tf.constant(g) for g in grads]
    layout = layout or _layout(len(grads))
    state = state if state is not None else policy.init(list(variables), layout)
    return policy.apply(grads, state, _context(grads, layout, variables)), state


def _arrays(result: ClipResult) -> list[np.ndarray]:
    return [tf.convert_to_tensor(g).numpy() for g in result.grads]


def _norm(*arrays: np.ndarray) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a.astype(np.float64)))) for a in arrays))


def _step(policy, state, norm: float, skipped=None) -> ClipResult:
    """One step whose gradient is the single value ``norm`` (so its global norm is |norm|)."""
    grads = [tf.constant([norm], tf.float32)]
    return policy.apply(grads, state, _context(grads, SCALAR_LAYOUT, skipped=skipped))


def _feed(policy, norms, state=None):
    """Run a sequence of scalar-norm steps; returns (state, coefs, skips)."""
    state = state if state is not None else policy.init([], SCALAR_LAYOUT)
    results = [_step(policy, state, float(n)) for n in norms]
    coefs = np.array([float(r.clip_coef) for r in results])
    skips = [None if r.skip is None else bool(r.skip) for r in results]
    return state, coefs, skips


def _snapshot(state: PolicyState) -> list[np.ndarray]:
    return [v.numpy().copy() for v in state.variables]


def _assert_unchanged(before: list[np.ndarray], state: PolicyState) -> None:
    for b, a in zip(before, _snapshot(state), strict=True):
        np.testing.assert_array_equal(a, b)


FACTORIES: dict[str, Callable[[], clip.ClipPolicy]] = {
    "by_value": lambda: clip.by_value(0.5),
    "by_norm": lambda: clip.by_norm(1.0),
    "global_norm": lambda: clip.global_norm(1.0),
    "layer_norm": lambda: clip.layer_norm(1.0, {"net/b": 0.5}),
    "agc": lambda: clip.agc(0.05),
    "autoclip": lambda: clip.autoclip(percentile=50, history=8, warmup_steps=2),
    "zclip": lambda: clip.zclip(warmup_steps=2),
    "skip_nonfinite": lambda: clip.skip_nonfinite(),
    "skip_spike": lambda: clip.skip_spike(window=8, min_history=2),
    "chain": lambda: clip.chain(clip.skip_nonfinite(), clip.zclip(warmup_steps=2), clip.agc()),
}

# -- configuration ---------------------------------------------------------------------------

BAD_CONFIGS = [
    (lambda: clip.by_value(0), "limit"),
    (lambda: clip.by_value(-1.0), "limit"),
    (lambda: clip.by_value(float("nan")), "limit"),
    (lambda: clip.by_value(float("inf")), "limit"),
    (lambda: clip.by_value(True), "limit"),
    (lambda: clip.by_value("1"), "limit"),
    (lambda: clip.by_norm(0.0), "max_norm"),
    (lambda: clip.global_norm(-2), "max_norm"),
    (lambda: clip.layer_norm(float("nan")), "max_norm"),
    (lambda: clip.layer_norm(1.0, {"*/embedding": -1}), r"overrides\['\*/embedding'\]"),
    (lambda: clip.layer_norm(1.0, {"net/*": float("inf")}), r"overrides\['net/\*'\]"),
    (lambda: clip.layer_norm(1.0, [("net/*", 1.0)]), "overrides"),
    (lambda: clip.layer_norm(1.0, {"": 1.0}), "overrides"),
    (lambda: clip.agc(clipping=0), "clipping"),
    (lambda: clip.agc(eps=-1e-3), "eps"),
    (lambda: clip.autoclip(percentile=0), "percentile"),
    (lambda: clip.autoclip(percentile=100.5), "percentile"),
    (lambda: clip.autoclip(percentile=float("nan")), "percentile"),
    (lambda: clip.autoclip(history=0), "history"),
    (lambda: clip.autoclip(history=2.5), "history"),
    (lambda: clip.autoclip(warmup_steps=0), "warmup_steps"),
    (lambda: clip.zclip(alpha=0), "alpha"),
    (lambda: clip.zclip(alpha=1), "alpha"),
    (lambda: clip.zclip(alpha=float("nan")), "alpha"),
    (lambda: clip.zclip(z_threshold=-2.5), "z_threshold"),
    (lambda: clip.zclip(warmup_steps=0), "warmup_steps"),
    (lambda: clip.zclip(eps=0.0), "eps"),
    (lambda: clip.skip_nonfinite(max_consecutive=0), "max_consecutive"),
    (lambda: clip.skip_nonfinite(max_consecutive=2.0), "max_consecutive"),
    (lambda: clip.skip_spike(sigma=0), "sigma"),
    (lambda: clip.skip_spike(sigma=float("inf")), "sigma"),
    (lambda: clip.skip_spike(window=1, min_history=1), "window"),
    (lambda: clip.skip_spike(window=8, min_history=1), "min_history"),
    (lambda: clip.skip_spike(window=8, min_history=9), "min_history"),
    (lambda: clip.chain(), "policies"),
    (lambda: clip.chain(clip.global_norm(1.0), "by_norm"), "policies"),
    (lambda: clip.chain(clip.global_norm(1.0), clip.global_norm(2.0)), "policies"),
    (lambda: clip.chain(clip.chain(clip.zclip(), clip.agc()), clip.zclip()), "policies"),
]


@pytest.mark.parametrize(("factory", "argument"), BAD_CONFIGS)
def test_factory_rejects_bad_configuration_naming_the_argument(factory, argument):
    with pytest.raises(ConfigError, match=rf"^{argument}:"):
        factory()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_is_exported_and_describes_itself_as_json(name):
    policy = FACTORIES[name]()
    assert name in clip.__all__
    assert isinstance(policy, clip.ClipPolicy)
    assert policy.name == name
    description = json.loads(json.dumps(policy.describe()))
    assert description["policy"] == name


def test_chain_flattens_nested_chains():
    inner = clip.chain(clip.skip_nonfinite(), clip.by_norm(2.0))
    policy = clip.chain(inner, clip.global_norm(1.0))
    names = [d["policy"] for d in policy.describe()["policies"]]
    assert names == ["skip_nonfinite", "by_norm", "global_norm"]


def test_threshold_change_takes_effect_without_retracing():
    policy = clip.global_norm(1.0)
    state = policy.init([], SCALAR_LAYOUT)
    traces = []

    @tf.function
    def step(g):
        traces.append(1)  # Python runs only while tracing
        return policy.apply([g], state, _context([g], SCALAR_LAYOUT)).grads[0]

    g = tf.constant([3.0, 4.0])
    np.testing.assert_allclose(step(g).numpy(), [0.6, 0.8], rtol=1e-6)
    state.max_norm.assign(2.5)
    np.testing.assert_allclose(step(g).numpy(), [1.5, 2.0], rtol=1e-6)
    assert len(traces) == 1


# -- properties of the stateless policies ----------------------------------------------------

_ELEMENT = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
_GRADS = st.lists(hnp.arrays(np.float32, _SHAPES, elements=_ELEMENT), min_size=1, max_size=3)
_LIMIT = st.floats(1e-2, 1e2)
_TOLERANCE = 1 + 1e-5


def _assert_never_scaled_up(new: list[np.ndarray], old: list[np.ndarray]) -> None:
    for n, o in zip(new, old, strict=True):
        assert np.all(np.abs(n) <= np.abs(o) * (1 + 1e-6))
        assert np.all(n * o >= 0)  # no sign flips


def _assert_reclip_is_identity(policy, result, layout, variables=()) -> None:
    again, _ = _apply(policy, _arrays(result), layout, variables)
    for a, b in zip(_arrays(again), _arrays(result), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-30)


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_by_value_property_bounds_elements_and_is_idempotent(grads, limit):
    policy = clip.by_value(limit)
    result, _ = _apply(policy, grads)
    new = _arrays(result)
    assert all(np.all(np.abs(a) <= np.float32(limit)) for a in new)
    _assert_never_scaled_up(new, grads)
    _assert_reclip_is_identity(policy, result, _layout(len(grads)))
    assert 0.0 <= float(result.clip_coef) <= 1.0


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_by_norm_property_bounds_each_tensor_and_is_idempotent(grads, limit):
    policy = clip.by_norm(limit)
    result, _ = _apply(policy, grads)
    new = _arrays(result)
    assert all(_norm(a) <= limit * _TOLERANCE for a in new)
    _assert_never_scaled_up(new, grads)
    _assert_reclip_is_identity(policy, result, _layout(len(grads)))
    np.testing.assert_allclose(float(result.stats.global_norm), _norm(*new), rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_global_norm_property_bounds_global_norm_and_is_idempotent(grads, limit):
    policy = clip.global_norm(limit)
    result, _ = _apply(policy, grads)
    new = _arrays(result)
    assert _norm(*new) <= limit * _TOLERANCE
    _assert_never_scaled_up(new, grads)
    _assert_reclip_is_identity(policy, result, _layout(len(grads)))
    np.testing.assert_allclose(float(result.stats.global_norm), _norm(*new), rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_layer_norm_property_bounds_each_layer_and_is_idempotent(grads, limit):
    layout = _layout(len(grads))
    policy = clip.layer_norm(limit, {"*/b": limit / 2, "net/*": limit / 4})  # first match wins
    result, state = _apply(policy, grads, layout)
    new = _arrays(result)
    np.testing.assert_allclose(state.limits.numpy(), [limit / 4, limit / 2][: layout.num_layers])
    assert _norm(new[0]) <= limit / 4 * _TOLERANCE
    assert _norm(*new[1:]) <= limit / 2 * _TOLERANCE
    _assert_never_scaled_up(new, grads)
    _assert_reclip_is_identity(policy, result, layout)
    np.testing.assert_allclose(result.stats.layer_norms.numpy()[0], _norm(new[0]), rtol=1e-5)


def _unit_norms_reference(x: np.ndarray) -> np.ndarray:
    """Output-unit norms: all axes but the last (HWIO, [in, out]); a vector is one unit.

    As optax's ``unitwise_norm`` (``optax/transforms/_clipping.py``: ``squeeze(x).ndim <= 1``
    → the whole norm) and timm's ``unitwise_norm`` (``x.ndim <= 1`` → ``x.norm()``).
    """
    x = x.astype(np.float64)
    if x.ndim <= 1:
        return np.sqrt(np.sum(np.square(x)))
    return np.sqrt(np.sum(np.square(x), axis=tuple(range(x.ndim - 1)), keepdims=True))


@settings(max_examples=25, deadline=None)
@given(st.data(), _GRADS, st.floats(1e-3, 1.0))
def test_agc_property_bounds_each_unit_and_is_idempotent(data, grads, clipping):
    weights = [data.draw(hnp.arrays(np.float32, g.shape, elements=_ELEMENT)) for g in grads]
    variables = [tf.Variable(w) for w in weights]
    policy = clip.agc(clipping, eps=1e-3)
    layout = _layout(len(grads))
    result, _ = _apply(policy, grads, layout, variables)
    new = _arrays(result)
    for g, w in zip(new, weights, strict=True):
        limit = clipping * np.maximum(_unit_norms_reference(w), 1e-3)
        assert np.all(_unit_norms_reference(g) <= limit * _TOLERANCE)
    _assert_never_scaled_up(new, grads)
    _assert_reclip_is_identity(policy, result, layout, variables)
    np.testing.assert_allclose(float(result.stats.global_norm), _norm(*new), rtol=1e-5)


# -- properties of the adaptive policies -----------------------------------------------------

_HISTORY = st.lists(st.floats(0.125, 10.0, width=32), min_size=4, max_size=16)
_LAST = st.floats(0.125, 1e4, width=32)


def _threshold_then_reclip(policy, history, last):
    """Apply ``last`` after ``history``; then re-clip its output on an identical state."""
    state, coefs, _ = _feed(policy, history)
    twin, _, _ = _feed(policy, history)
    before = _snapshot(state)
    result = _step(policy, state, last)
    clipped = float(_arrays(result)[0][0])
    again = _step(policy, twin, clipped)
    return result, clipped, float(_arrays(again)[0][0]), coefs, before


@settings(max_examples=12, deadline=None)
@given(_HISTORY, _LAST, st.sampled_from([10.0, 50.0, 100.0]))
def test_autoclip_property_clips_to_percentile_of_previous_norms(history, last, percentile):
    policy = clip.autoclip(percentile=percentile, history=8, warmup_steps=4)
    _, clipped, again, coefs, _ = _threshold_then_reclip(policy, history, last)
    threshold = np.percentile(np.array(history[-8:], np.float32), percentile)
    assert clipped <= last * (1 + 1e-6)
    assert clipped <= threshold * _TOLERANCE
    assert np.all(coefs <= 1.0)
    np.testing.assert_allclose(again, clipped, rtol=2e-6)


@settings(max_examples=12, deadline=None)
@given(_HISTORY, _LAST)
def test_zclip_property_never_scales_up_and_reclip_is_identity(history, last):
    policy = clip.zclip(warmup_steps=4)
    _, clipped, again, coefs, _ = _threshold_then_reclip(policy, history, last)
    assert clipped <= last * (1 + 1e-6)
    assert np.all(coefs <= 1.0)
    np.testing.assert_allclose(again, clipped, rtol=2e-6)


@settings(max_examples=12, deadline=None)
@given(_HISTORY, _LAST)
def test_skip_spike_property_skips_only_above_mean_plus_sigma_std(history, last):
    policy = clip.skip_spike(sigma=3.0, window=8, min_history=4)
    state, coefs, _ = _feed(policy, history)
    before = _snapshot(state)
    result = _step(policy, state, last)
    assert np.all(coefs <= 1.0)
    recent = _window_reference(history, sigma=3.0, window=8, min_history=4)[-8:]
    mean, std = np.mean(recent), max(np.std(recent, ddof=1), 1e-3 * np.mean(recent))
    margin = last - mean - 3.0 * std
    assume(abs(margin) > 1e-4 * (mean + std))  # not within float32 rounding of the threshold
    assert bool(result.skip) == (margin > 0)
    assert float(result.clip_coef) == (0.0 if margin > 0 else 1.0)
    # The threshold came from the window before this norm; a skipped norm enters winsorized.
    entered = state.norms.numpy()[len(history) % 8]
    assert entered == pytest.approx(mean + 3.0 * std if margin > 0 else last, rel=1e-5)
    assert int(state.count.numpy()) == len(history) + 1
    del before


# -- NaN / Inf are kept out of gradients and statistics ---------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
@settings(max_examples=8, deadline=None)
@given(_GRADS, st.data(), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_policy_property_nonfinite_never_reaches_gradients_or_statistics(name, grads, data, bad):
    policy = FACTORIES[name]()
    layout = _layout(len(grads))
    variables = [tf.Variable(np.ones_like(g)) for g in grads]
    state = policy.init(variables, layout)
    for scale in (1.0, 2.0, 0.5):  # warm the adaptive statistics up with finite steps
        _apply(policy, [g * scale for g in grads], layout, variables, state)
    subs = list(state.policies) if name == "chain" else [state]
    before = [_snapshot(sub) for sub in subs]
    which = data.draw(st.integers(0, len(grads) - 1))
    poisoned = [g.copy() for g in grads]
    flat = poisoned[which].reshape(-1)
    flat[data.draw(st.integers(0, flat.size - 1))] = bad
    result, _ = _apply(policy, poisoned, layout, variables, state)
    assert all(np.isfinite(a).all() for a in _arrays(result))
    assert float(result.clip_coef) == 0.0
    if result.skip is not None:
        assert bool(result.skip)
    if name in ("skip_nonfinite", "chain"):  # skip_nonfinite counts the step, by design
        counters = subs[0]
        assert int(counters.consecutive.numpy()) == 1
        assert int(counters.total.numpy()) == 1
        subs, before = subs[1:], before[1:]
    for sub, snapshot in zip(subs, before, strict=True):
        _assert_unchanged(snapshot, sub)


# -- reference values ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_by_value_matches_tf_clip_by_value(grads, limit):
    result, _ = _apply(clip.by_value(limit), grads)
    for got, g in zip(_arrays(result), grads, strict=True):
        np.testing.assert_array_equal(got, tf.clip_by_value(g, -limit, limit).numpy())


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_by_norm_matches_tf_clip_by_norm(grads, limit):
    result, _ = _apply(clip.by_norm(limit), grads)
    for got, g in zip(_arrays(result), grads, strict=True):
        np.testing.assert_allclose(got, tf.clip_by_norm(g, limit).numpy(), rtol=1e-5, atol=1e-30)


@settings(max_examples=25, deadline=None)
@given(_GRADS, _LIMIT)
def test_global_norm_matches_tf_clip_by_global_norm(grads, limit):
    result, _ = _apply(clip.global_norm(limit), grads)
    want, norm = tf.clip_by_global_norm([tf.constant(g) for g in grads], limit)
    for got, w in zip(_arrays(result), want, strict=True):
        np.testing.assert_allclose(got, w.numpy(), rtol=1e-5, atol=1e-30)
    want_coef = min(1.0, limit / float(norm)) if float(norm) > 0 else 1.0
    np.testing.assert_allclose(float(result.clip_coef), want_coef, rtol=1e-5)


def _agc_reference(grad: np.ndarray, weight: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """Adaptive gradient clipping, float64.

    Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization", §4.1 eq. (3): G_i ← λ · max(‖W_i‖, ε) / ‖G_i‖ · G_i when
    ‖G_i‖ / max(‖W_i‖, ε) > λ, for each output unit i (the last axis of an HWIO or
    [in, out] kernel; a whole vector). The 1e-6 floor is optax's
    ``unitwise_clip`` (``optax/transforms/_clipping.py``).
    """
    g_norm = _unit_norms_reference(grad)
    max_norm = clipping * np.maximum(_unit_norms_reference(weight), eps)
    clipped = grad * (max_norm / np.maximum(g_norm, 1e-6))
    return np.where(g_norm > max_norm, clipped, grad.astype(np.float64))


def test_agc_matches_reference_for_dense_conv_and_bias():
    rng = np.random.default_rng(7)
    shapes = [(3, 3, 2, 4), (4,), (5, 3), (3,)]  # conv HWIO kernel, bias, dense [in, out], bias
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    weights[3][:] = 0.0  # zero-initialised bias: its limit is clipping * eps
    grads = [
        (rng.normal(size=s) * rng.choice([0.001, 0.1], size=s)).astype(np.float32) for s in shapes
    ]
    layout = LayerLayout(("net/conv", "net/dense"), (0, 0, 1, 1))
    variables = [tf.Variable(w) for w in weights]
    result, _ = _apply(clip.agc(0.05, eps=1e-3), grads, layout, variables)
    clipped_any = False
    for got, g, w in zip(_arrays(result), grads, weights, strict=True):
        want = _agc_reference(g, w, 0.05, 1e-3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
        clipped_any |= not np.allclose(want, g)
    assert clipped_any
    assert not np.allclose(_arrays(result)[0], grads[0])  # some conv units were clipped...
    kernel_units = _unit_norms_reference(grads[0]).ravel()
    limits = 0.05 * np.maximum(_unit_norms_reference(weights[0]).ravel(), 1e-3)
    assert (kernel_units <= limits).any()  # ...and some were not


def _autoclip_reference(norms, percentile, history, warmup):
    """AutoClip, Seetharaman et al. 2020 ("AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", §2): clip to ``np.percentile`` of the observed norms; here of
    the last ``history`` norms *before* the current one (a spike never raises its own
    threshold), after ``warmup`` norms.
    """
    seen: list[float] = []
    coefs = []
    for g in norms:
        coef = 1.0
        if len(seen) >= warmup:
            threshold = float(np.percentile(np.array(seen[-history:], np.float32), percentile))
            if threshold > 0 and g > threshold:
                coef = threshold / g
        coefs.append(coef)
        seen.append(g)
    return np.array(coefs)


@pytest.mark.parametrize("percentile", [10, 37.5, 100])
def test_autoclip_matches_np_percentile_over_a_wrapping_history(percentile):
    rng = np.random.default_rng(3)
    norms = rng.lognormal(0.0, 0.7, size=40).astype(np.float32)
    norms[[12, 25, 26]] *= 50  # spikes, one of them repeated
    policy = clip.autoclip(percentile=percentile, history=7, warmup_steps=3)
    _, coefs, skips = _feed(policy, norms)
    want = _autoclip_reference([float(n) for n in norms], percentile, 7, 3)
    np.testing.assert_allclose(coefs, want, rtol=2e-6)
    assert (coefs < 1).any()
    assert skips == [None] * len(norms)


def test_autoclip_spike_is_clipped_to_the_threshold_of_the_norms_before_it():
    policy = clip.autoclip(percentile=100, history=16, warmup_steps=3)
    _, coefs, _ = _feed(policy, [1.0, 2.0, 4.0, 400.0])
    assert coefs.tolist()[:3] == [1.0, 1.0, 1.0]
    assert coefs[3] == pytest.approx(4.0 / 400.0, rel=1e-6)


def _zclip_reference(norms, alpha, z_thr, warmup, eps=1e-6):
    """ZClip, Kumar, Owen, Roy Chowdhury, Güra 2025 ("ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training", arXiv:2504.02507, Algorithm 1; reference code
    github.com/bluorion-com/ZClip ``zclip/zclip.py``, mode "zscore", adaptive_scaling,
    clip_factor 1), float64.
    """
    buffer: list[float] = []
    mean = var = None
    coefs = []
    for g in norms:
        if mean is None:  # warm-up: collect, then initialise from mean and population var
            buffer.append(g)
            coefs.append(1.0)
            if len(buffer) == warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            continue
        std = var**0.5
        z = (g - mean) / (std + eps)
        if z > z_thr:
            eta = z / z_thr
            g_star = mean + (z_thr * std) / eta  # reciprocal clipping: mean + z_thr² / z · std
            coefs.append(g_star / g)
        else:
            g_star = g
            coefs.append(1.0)
        mean = alpha * mean + (1 - alpha) * g_star  # EMA of the clipped norm ...
        var = alpha * var + (1 - alpha) * (g_star - mean) ** 2  # ... with the new mean
    return np.array(coefs), mean, var


def test_zclip_matches_published_algorithm_over_a_sequence():
    rng = np.random.default_rng(11)
    norms = (1.0 + 0.1 * rng.normal(size=80)).astype(np.float32)
    norms[[20, 21, 45, 70]] = [8.0, 30.0, 5.0, 1e4]  # spikes, two in a row
    policy = clip.zclip(alpha=0.9, z_threshold=2.5, warmup_steps=10)
    state, coefs, _ = _feed(policy, norms)
    want, mean, var = _zclip_reference([float(n) for n in norms], 0.9, 2.5, 10)
    np.testing.assert_allclose(coefs, want, rtol=1e-5)
    assert (coefs[[20, 21, 45, 70]] < 0.5).all()
    assert float(state.mean.numpy()) == pytest.approx(mean, rel=1e-5)
    assert float(state.var.numpy()) == pytest.approx(var, rel=1e-4)


def test_skip_nonfinite_matches_optax_apply_if_finite_semantics():
    # optax/transforms/_conditionality.py apply_if_finite: count consecutive non-finite
    # steps (reset by a finite one); apply when finite or count > max_consecutive_errors.
    pattern = [1.0, np.nan, np.inf, np.nan, 2.0, np.nan, np.nan, np.nan, np.nan]
    policy = clip.skip_nonfinite(max_consecutive=2)
    state = policy.init([], SCALAR_LAYOUT)
    count, want = 0, []
    for value in pattern:
        finite = math.isfinite(value)
        count = 0 if finite else count + 1
        want.append(not (finite or count > 2))
    got = [bool(_step(policy, state, v).skip) for v in pattern]
    assert got == want == [False, True, True, False, False, True, True, False, False]
    assert int(state.total.numpy()) == 7
    assert int(state.consecutive.numpy()) == 4


def test_skip_nonfinite_gives_up_by_applying_the_gradient_as_is():
    policy = clip.skip_nonfinite(max_consecutive=1)
    state = policy.init([], SCALAR_LAYOUT)
    assert bool(_step(policy, state, np.nan).skip)
    result = _step(policy, state, np.nan)
    assert not bool(result.skip)
    assert np.isnan(_arrays(result)[0]).all()
    assert float(result.clip_coef) == 1.0


def _window_reference(norms, sigma, window, min_history):
    """The window skip_spike keeps: OLMo-core's SkipStepOptimizer rule
    (olmo_core/optim/skip_step_optimizer.py: skip when x − mean > sigma · std of the
    previous window, sample std) with gradwatch's documented choices: a skipped spike
    enters winsorized to its threshold, σ ≥ 1e-3 · mean, non-finite norms never enter.
    """
    entries: list[float] = []
    for g in norms:
        if not math.isfinite(g):
            continue
        entry = g
        if len(entries) >= min_history:
            recent = np.array(entries[-window:], np.float64)
            mean = recent.mean()
            std = max(recent.std(ddof=1), 1e-3 * mean)
            if std > 0 and g - mean > sigma * std:
                entry = mean + sigma * std
        entries.append(entry)
    return np.array(entries)


def test_skip_spike_matches_reference_and_does_not_hide_the_next_spike():
    rng = np.random.default_rng(5)
    norms = list((1.0 + 0.05 * rng.normal(size=30)).astype(np.float32))
    norms[12] = 50.0
    norms[13] = 50.0  # the same spike right after: not hidden by the first one
    norms[20] = float("nan")
    policy = clip.skip_spike(sigma=6.0, window=8, min_history=4)
    state, coefs, skips = _feed(policy, norms)
    assert [i for i, s in enumerate(skips) if s] == [12, 13, 20]
    assert coefs[[12, 13, 20]].tolist() == [0.0, 0.0, 0.0]
    want = _window_reference([float(n) for n in norms], 6.0, 8, 4)
    count = int(state.count.numpy())
    assert count == len(want) == 29
    ring = state.norms.numpy()
    expected_ring = np.empty(8)
    for i, value in enumerate(want):
        expected_ring[i % 8] = value
    np.testing.assert_allclose(ring, expected_ring, rtol=1e-5)


def test_skip_spike_accepts_a_lasting_level_shift_within_a_few_windows():
    norms = [1.0 + 0.1 * math.sin(i) for i in range(16)] + [10.0] * 48
    policy = clip.skip_spike(sigma=6.0, window=8, min_history=4)
    _, _, skips = _feed(policy, norms)
    assert skips[16]  # the shift is a spike at first
    assert not any(skips[16 + 3 * 8 :])  # and the window has caught up within 3 windows


# -- σ = 0, zero norms, spikes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["autoclip", "zclip", "skip_spike"], ids=["autoclip", "zclip", "skip_spike"]
)
@pytest.mark.parametrize("value", [0.0, 0.3, 7.0])
def test_adaptive_policy_with_constant_norms_never_clips(name, value):
    policy = FACTORIES[name]()
    state, coefs, skips = _feed(policy, [value] * 20)
    assert coefs.tolist() == [1.0] * 20
    assert not any(skips)
    assert all(np.isfinite(v).all() for v in _snapshot(state))
    if name == "zclip":
        assert float(state.mean.numpy()) == np.float32(value)
        assert float(state.var.numpy()) == 0.0


@pytest.mark.parametrize("name", ["autoclip", "zclip", "skip_spike"])
def test_adaptive_policy_after_all_zero_norms_does_not_zero_the_gradient(name):
    policy = FACTORIES[name]()
    _, coefs, skips = _feed(policy, [0.0] * 10 + [1.0, 1.2, 0.9])
    assert coefs[:11].tolist() == [1.0] * 11  # the first norm after the zeros passes
    assert (coefs > 0.1).all()  # later ones may be clipped (ZClip's EMA adapts slowly)
    assert not any(skips)


def test_zclip_spike_is_clipped_against_statistics_before_it():
    policy = clip.zclip(alpha=0.9, z_threshold=2.0, warmup_steps=4)
    state, _coefs, _ = _feed(policy, [1.0, 1.2, 0.8, 1.0])
    mean, var = float(state.mean.numpy()), float(state.var.numpy())
    result = _step(policy, state, 100.0)
    std = math.sqrt(var)
    z = (100.0 - mean) / (std + 1e-6)
    assert float(result.clip_coef) == pytest.approx((mean + 4.0 / z * std) / 100.0, rel=1e-5)
    assert float(state.mean.numpy()) < 1.1  # the EMA took the clipped norm


def test_zclip_during_warmup_does_not_clip_and_counts_only_finite_norms():
    policy = clip.zclip(warmup_steps=3)
    state, coefs, _ = _feed(policy, [1.0, 500.0, np.nan, 2.0])
    assert coefs.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert int(state.count.numpy()) == 3
    assert float(state.mean.numpy()) == pytest.approx(503.0 / 3, rel=1e-6)
    assert float(state.var.numpy()) == pytest.approx(np.var([1.0, 500.0, 2.0]), rel=1e-5)


# -- overflow, IndexedSlices, None -----------------------------------------------------------


@pytest.mark.parametrize("name", ["by_norm", "global_norm", "layer_norm"])
def test_norm_policies_clip_float32_elements_of_1e30_exactly(name):
    big = np.full(64, 1e30, np.float32)  # squares overflow float32; true norm 8e30
    small = np.array([3.0, 4.0], np.float32)
    policy = {
        "by_norm": clip.by_norm(1.0),
        "global_norm": clip.global_norm(1.0),
        "layer_norm": clip.layer_norm(1.0),
    }[name]
    layout = LayerLayout(("net/a", "net/b"), (0, 1))
    result, _ = _apply(policy, [big, small], layout)
    got_big, got_small = _arrays(result)
    np.testing.assert_allclose(got_big, np.full(64, 0.125), rtol=1e-5)
    if name == "global_norm":
        np.testing.assert_allclose(got_small, small / 8e30, rtol=1e-5)
        assert float(result.stats.global_norm) == pytest.approx(1.0, rel=1e-5)
    else:
        np.testing.assert_allclose(got_small, [0.6, 0.8], rtol=1e-5)
        assert float(result.stats.global_norm) == pytest.approx(math.sqrt(2.0), rel=1e-5)
    assert float(result.clip_coef) == pytest.approx(
        float(result.stats.global_norm) / 8e30, rel=1e-5
    )


def test_by_value_clips_the_sum_of_duplicate_indexed_slices():
    # Rows 0 and 0 again sum to 1.6 in the update: that sum is what must be clipped.
    slices = tf.IndexedSlices(
        tf.constant([[0.8, -0.8], [0.8, -0.8], [0.3, 0.2]]),
        tf.constant([0, 0, 2]),
        tf.constant([4, 2]),
    )
    layout = LayerLayout(("net/emb",), (0,))
    result = clip.by_value(1.0).apply(
        [slices], clip.by_value(1.0).init([], layout), _context([slices], layout)
    )
    assert isinstance(result.grads[0], tf.IndexedSlices)
    np.testing.assert_allclose(
        tf.convert_to_tensor(result.grads[0]).numpy(), [[1.0, -1.0], [0, 0], [0.3, 0.2], [0, 0]]
    )


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_policy_treats_indexed_slices_as_their_dense_sum(name):
    values = np.array([[0.5, 0.5], [0.5, 0.5], [3.0, 4.0]], np.float32)
    slices = tf.IndexedSlices(tf.constant(values), tf.constant([0, 0, 3]), tf.constant([5, 2]))
    dense = tf.convert_to_tensor(slices)
    other = tf.constant([[2.0, -1.0, 0.5]])
    layout = LayerLayout(("net/emb", "net/dense"), (0, 1))
    variables = [tf.Variable(np.full((5, 2), 0.5, np.float32)), tf.Variable(np.ones((1, 3), "f4"))]
    got = []
    for grads in ([slices, other], [dense, other]):
        policy = FACTORIES[name]()
        state = policy.init(variables, layout)
        result = policy.apply(grads, state, _context(grads, layout, variables))
        got.append([tf.convert_to_tensor(g).numpy() for g in result.grads])
        if grads[0] is slices:
            assert isinstance(result.grads[0], tf.IndexedSlices)
    for a, b in zip(*got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_policy_passes_none_gradients_through(name):
    layout = LayerLayout(("net/a", "net/b"), (0, 1))
    variables = [tf.Variable([1.0, 2.0]), tf.Variable([[1.0, 2.0]])]
    grads = [None, tf.constant([[30.0, 40.0]])]
    policy = FACTORIES[name]()
    result = policy.apply(grads, policy.init(variables, layout), _context(grads, layout, variables))
    assert result.grads[0] is None
    assert np.isfinite(result.grads[1].numpy()).all()
    assert result.stats is not None
    assert float(result.stats.variable_norms[0]) == 0.0


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_policy_keeps_half_precision_gradients_in_their_dtype(name):
    layout = LayerLayout(("net/a",), (0, 0))
    variables = [tf.Variable(np.ones((2, 3), np.float32)), tf.Variable(np.ones(3, np.float32))]
    grads = [
        tf.constant(np.full((2, 3), 300.0, np.float16)),
        tf.constant([1.0, -2.0, 3.0], tf.float16),
    ]
    policy = FACTORIES[name]()
    result = policy.apply(grads, policy.init(variables, layout), _context(grads, layout, variables))
    assert [g.dtype for g in result.grads] == [tf.float16, tf.float16]
    assert all(np.isfinite(g.numpy()).all() for g in result.grads)
    assert float(result.clip_coef) <= 1.0


# -- chain -----------------------------------------------------------------------------------


def test_chain_applies_in_order_and_reports_final_over_initial_norm():
    grads = [np.array([3.0, 4.0], np.float32), np.array([0.0, 12.0], np.float32)]
    layout = _layout(2)
    result, _ = _apply(clip.chain(clip.by_norm(4.0), clip.global_norm(2.0)), grads, layout)
    step1 = [grads[0] * 4 / 5, grads[1] * 4 / 12]
    want = [g * 2.0 / _norm(*step1) for g in step1]
    for got, w in zip(_arrays(result), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6)
    assert float(result.clip_coef) == pytest.approx(2.0 / 13.0, rel=1e-6)
    assert result.skip is None
    assert float(result.stats.global_norm) == pytest.approx(2.0, rel=1e-6)


@dataclass(frozen=True)
class _Halve:
    """A user-defined policy that leaves its statistics to be recomputed."""

    name: str = "halve"

    def init(self, variables, layout):
        return PolicyState(name="halve")

    def apply(self, grads, state, context):
        return ClipResult([g * 0.5 for g in grads], tf.constant(0.5), None, None)

    def describe(self):
        return {"policy": self.name}


def test_chain_recomputes_statistics_a_policy_does_not_return():
    grads = [np.array([6.0, 8.0], np.float32)]
    result, _ = _apply(clip.chain(_Halve(), clip.global_norm(4.0)), grads)
    np.testing.assert_allclose(_arrays(result)[0], [2.4, 3.2], rtol=1e-6)
    assert float(result.clip_coef) == pytest.approx(0.4, rel=1e-6)


def test_chain_skip_is_the_or_of_its_skip_policies():
    policy = clip.chain(clip.skip_nonfinite(), clip.skip_spike(window=4, min_history=2))
    _state, coefs, skips = _feed(policy, [1.0, 1.1, 0.9, 1.0, 1e4, np.nan, 1.0])
    assert skips == [False, False, False, False, True, True, False]
    assert coefs.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_chain_policies_after_a_skip_keep_their_state():
    policy = clip.chain(
        clip.skip_nonfinite(),
        clip.skip_spike(window=8, min_history=4),
        clip.zclip(warmup_steps=2),
        clip.autoclip(warmup_steps=2, history=8),
    )
    state, _, _ = _feed(policy, [1.0, 1.1, 0.9, 1.0, 1.05])
    nonfinite, spike, *later = state.policies
    before = [_snapshot(sub) for sub in later]
    _, coefs, skips = _feed(policy, [np.nan, 1e4], state)
    assert skips == [True, True]
    assert coefs.tolist() == [0.0, 0.0]
    assert int(nonfinite.total.numpy()) == 1
    assert int(spike.count.numpy()) == 6  # the NaN never entered; the spike did, winsorized
    for sub, snapshot in zip(later, before, strict=True):
        _assert_unchanged(snapshot, sub)  # zclip and autoclip learned nothing from either


def test_chain_warns_when_a_skip_policy_comes_after_a_scaling_one():
    with pytest.warns(UserWarning, match=r"puts skip_nonfinite after global_norm; a skip policy"):
        clip.chain(clip.global_norm(1.0), clip.skip_nonfinite())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.chain(clip.skip_nonfinite(), clip.skip_spike(), clip.global_norm(1.0))


def test_chain_of_every_policy_under_xla_matches_eager():
    with pytest.warns(UserWarning, match="skip policy should come first"):  # sorted by name
        policy = clip.chain(*(FACTORIES[n]() for n in sorted(FACTORIES) if n != "chain"))
    layout = LayerLayout(("net/a", "net/b"), (0, 1, 1))
    rng = np.random.default_rng(2)
    shapes = [(4, 3), (3,), (3, 2)]
    variables = [tf.Variable(rng.normal(size=s).astype(np.float32)) for s in shapes]
    eager_state = policy.init(variables, layout)
    xla_state = policy.init(variables, layout)

    @tf.function(jit_compile=True)
    def compiled(*grads):
        result = policy.apply(list(grads), xla_state, _context(list(grads), layout, variables))
        return result.grads, result.clip_coef, result.skip

    for i in range(8):
        grads = [
            tf.constant(rng.normal(size=s).astype(np.float32) * (1 + 20 * (i == 6))) for s in shapes
        ]
        if i == 5:
            grads[1] = tf.constant([np.nan, 1.0, 1.0], tf.float32)
        eager = policy.apply(list(grads), eager_state, _context(grads, layout, variables))
        xla_grads, xla_coef, xla_skip = compiled(*grads)
        for a, b in zip(eager.grads, xla_grads, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
        assert float(eager.clip_coef) == pytest.approx(float(xla_coef), rel=1e-5, abs=1e-7)
        assert bool(eager.skip) == bool(xla_skip)
    for a, b in zip(_snapshot(eager_state), _snapshot(xla_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


# -- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zclip", "autoclip", "skip_spike"])
def test_checkpoint_restores_adaptive_state_so_thresholds_continue_exactly(name, tmp_path):
    policy = {
        "zclip": clip.zclip(warmup_steps=5),
        "autoclip": clip.autoclip(percentile=30, history=6, warmup_steps=3),
        "skip_spike": clip.skip_spike(sigma=2.0, window=6, min_history=3),
    }[name]
    rng = np.random.default_rng(9)
    first = rng.lognormal(0.0, 0.5, size=20)
    then = rng.lognormal(0.0, 0.5, size=12) * np.where(np.arange(12) % 4 == 0, 10.0, 1.0)
    state, _, _ = _feed(policy, first)
    path = tf.train.Checkpoint(state=state).write(str(tmp_path / "policy"))
    _, want_coefs, want_skips = _feed(policy, then, state)
    assert (want_coefs < 1).any()  # the continuation does clip or skip

    resumed = policy.init([], SCALAR_LAYOUT)  # a fresh run, as after a restart
    tf.train.Checkpoint(state=resumed).read(path).assert_consumed()
    _, coefs, skips = _feed(policy, then, resumed)
    np.testing.assert_array_equal(coefs, want_coefs)
    assert skips == want_skips
    for a, b in zip(_snapshot(resumed), _snapshot(state), strict=True):
        np.testing.assert_array_equal(a, b)
