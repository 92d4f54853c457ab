"""Detectors: synthetic streams with known answers (pure NumPy, no database, no clock).

Streams are seeded lognormal gradient norms; every expectation is an exact step or a bound.
Measured figures (false-alarm rate, blow-up delay) are printed (``pytest -s``), never timed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gradwatch.server.detect import (
    Detection,
    DetectorConfig,
    DetectorState,
    ExplosionThresholds,
    LayerOverride,
    Rule,
    Severity,
    StateFormatError,
    StepColumns,
    Thresholds,
    detect,
)
from tests.fakes import ar1_norms

FLOAT32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- helpers


def _columns(
    first: int,
    grad_norm: np.ndarray,
    *,
    global_norm: np.ndarray | None = None,
    nonfinite: np.ndarray | None = None,
    clip_coef: np.ndarray | None = None,
    skipped: np.ndarray | None = None,
    layers: Sequence[str] | None = None,
    steps: np.ndarray | None = None,
) -> StepColumns:
    """A batch of ``len(grad_norm)`` steps from ``first``; by default the global norm is the
    quadrature sum of the layers, nothing is clipped, skipped or non-finite."""
    grad_norm = np.asarray(grad_norm, np.float64)
    n, width = grad_norm.shape
    if global_norm is None:
        with np.errstate(over="ignore", invalid="ignore"):
            global_norm = np.sqrt((grad_norm**2).sum(axis=1))
    return StepColumns(
        steps=np.arange(first, first + n, dtype=np.int64) if steps is None else steps,
        layers=tuple(layers or (f"layer_{i}" for i in range(width))),
        global_norm=np.asarray(global_norm, np.float32),
        grad_norm=grad_norm.astype(np.float32),
        nonfinite=np.zeros((n, width), np.int64) if nonfinite is None else nonfinite,
        clip_coef=np.ones(n, np.float32) if clip_coef is None else clip_coef,
        skipped=np.zeros(n, np.bool_) if skipped is None else skipped,
    )


def _slice(columns: StepColumns, start: int, stop: int) -> StepColumns:
    return StepColumns(
        steps=columns.steps[start:stop],
        layers=columns.layers,
        global_norm=columns.global_norm[start:stop],
        grad_norm=columns.grad_norm[start:stop],
        nonfinite=columns.nonfinite[start:stop],
        clip_coef=columns.clip_coef[start:stop],
        skipped=columns.skipped[start:stop],
    )


class _Store:
    """What the lead's storage does with results: continuations update the stored event."""

    def __init__(self) -> None:
        self.events: list[Detection] = []
        self._open: dict[tuple[Rule, str], int] = {}
        self.triggers: dict[tuple[Rule, Severity], int] = {}
        self.state: DetectorState | None = None

    def feed(self, batch: StepColumns, config: DetectorConfig, *, via_bytes: bool = False):
        state = self.state
        if via_bytes and state is not None:
            state = DetectorState.from_bytes(state.to_bytes())
        result = detect(state, batch, config)
        self.state = result.state
        for key, count in result.triggers.items():
            self.triggers[key] = self.triggers.get(key, 0) + count
        for event in result.events:
            key = (event.rule, event.layer)
            if event.continues:
                index = self._open[key]
                self.events[index] = self.events[index].merged(event)
            else:
                self._open[key] = len(self.events)
                self.events.append(event)
        return result


def _feed(
    columns: StepColumns, config: DetectorConfig, batch: int = 50, *, via_bytes: bool = False
) -> _Store:
    store = _Store()
    for start in range(0, len(columns.steps), batch):
        store.feed(_slice(columns, start, start + batch), config, via_bytes=via_bytes)
    return store


def _explosions(store: _Store, layer: str | None = None) -> list[Detection]:
    return [
        e for e in store.events if e.rule is Rule.EXPLOSION and (layer is None or e.layer == layer)
    ]


def _config(**explosion) -> DetectorConfig:
    return DetectorConfig(thresholds=Thresholds(explosion=ExplosionThresholds(**explosion)))


def _lognormal(seed: int, steps: int, width: int, sigma: float = 0.2) -> np.ndarray:
    return np.exp(sigma * np.random.default_rng(seed).standard_normal((steps, width)))


# --------------------------------------------------------------------------- explosion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detect_catches_single_step_spikes_at_the_spike_step(seed):
    norms = _lognormal(seed, 3000, 4)
    norms[1500, 1] *= 10.0
    norms[2200, 2] *= 100.0
    norms[2600, :] *= 100.0  # every layer, so the global norm spikes 100× too

    store = _feed(_columns(0, norms), DetectorConfig())

    found = {(e.layer, e.first_step, e.severity, e.count) for e in store.events}
    assert found == {
        ("layer_1", 1500, Severity.WARNING, 1),
        ("", 1500, Severity.WARNING, 1),  # one layer of 4 at 10×: the global norm ~5×
        ("layer_2", 2200, Severity.CRITICAL, 1),
        ("", 2200, Severity.CRITICAL, 1),
        ("", 2600, Severity.CRITICAL, 1),
        *{(f"layer_{i}", 2600, Severity.CRITICAL, 1) for i in range(4)},
    }
    assert all(e.rule is Rule.EXPLOSION for e in store.events)
    spike = next(e for e in store.events if e.layer == "layer_1")
    assert spike.value == pytest.approx(norms[1500, 1], rel=1e-6)
    assert spike.baseline == pytest.approx(1.0, rel=0.1)  # the median of lognormal(0, σ)
    assert store.triggers == {
        (Rule.EXPLOSION, Severity.WARNING): 2,
        (Rule.EXPLOSION, Severity.CRITICAL): 7,
    }


def test_detect_spike_leaves_the_baseline_untouched():
    norms = _lognormal(3, 1001, 2)
    norms[1000, 0] *= 10.0
    columns = _columns(0, norms, global_norm=np.ones(1001))
    before = detect(None, _slice(columns, 0, 1000), DetectorConfig())

    after = detect(before.state, _slice(columns, 1000, 1001), DetectorConfig())

    assert [e.first_step for e in after.events] == [1000]
    assert after.state.baseline("layer_0") == before.state.baseline("layer_0")
    following = _columns(1001, np.full((1, 2), norms[999, 0]), global_norm=np.ones(1))
    assert detect(after.state, following, DetectorConfig()).events == []


@pytest.mark.parametrize(
    ("rate", "bound"),
    [(1.01, 300), (1.05, 60)],
    ids=["x1.01", "x1.05"],
)
@pytest.mark.parametrize("onset", [300, 2000])
def test_detect_catches_exponential_blowup_long_before_float32_overflow(rate, bound, onset):
    delays = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        steps = onset + 3000
        log_norm = 0.2 * rng.standard_normal((steps, 2))
        log_norm[onset:, 0] += math.log(rate) * np.arange(1, steps - onset + 1)
        store = _feed(_columns(0, np.exp(np.minimum(log_norm, 80.0))), DetectorConfig())

        events = _explosions(store, "layer_0")
        assert events, f"seed {seed}: blow-up ×{rate}/step never caught"
        assert events[0].first_step >= onset, "alarm before the blow-up began"
        delays.append(events[0].first_step - onset + 1)
        assert _explosions(store, "layer_1") == []
    overflow_steps = math.log(FLOAT32_MAX) / math.log(rate)
    print(
        f"blow-up ×{rate}/step from step {onset}: caught after {sorted(delays)} steps "
        f"(float32 overflows after {overflow_steps:.0f})"
    )
    assert max(delays) <= bound
    assert rate ** max(delays) < 1e3  # the norm grew less than 1000× before the alarm


def test_detect_blowup_slower_than_max_growth_is_followed():
    rng = np.random.default_rng(4)
    steps = 6000
    growth_per_step = math.log(2.0) / 1000  # ×2 per 1000 steps, below max_growth (×4)
    log_norm = 0.2 * rng.standard_normal((steps, 2)) + growth_per_step * np.arange(steps)[:, None]

    store = _feed(_columns(0, np.exp(log_norm)), DetectorConfig())

    assert store.events == []


def test_detect_permanent_level_shift_raises_one_event_that_ends():
    norms = _lognormal(18, 12_000, 1)
    norms[3000:] *= 10.0  # a new level for good, e.g. after a learning-rate change

    store = _feed(_columns(0, norms, global_norm=np.ones(12_000)), DetectorConfig())

    events = _explosions(store)
    assert events[0].first_step == 3000
    assert events[0].count > 500
    assert max(e.last_step for e in events) < 6000  # ~log(10)/log(max_growth) kilo-steps
    print(f"×10 level shift: events {[(e.first_step, e.last_step, e.count) for e in events]}")


def test_detect_nan_mid_run_is_nonfinite_and_does_not_poison_detection():
    norms = _lognormal(5, 3000, 3)
    nonfinite = np.zeros((3000, 3), np.int64)
    norms[1000, 1] = np.nan
    nonfinite[1000, 1] = 12
    norms[2000, 1] *= 10.0
    norms[2500, 1] *= 100.0
    columns = _columns(0, norms, nonfinite=nonfinite)
    config = DetectorConfig()
    before = detect(None, _slice(columns, 0, 1000), config).state

    at_nan = detect(before, _slice(columns, 1000, 1001), config)
    store = _feed(columns, config)

    assert {(e.rule, e.layer, e.first_step, e.value) for e in at_nan.events} == {
        (Rule.NONFINITE, "layer_1", 1000, 12.0),
        (Rule.NONFINITE, "", 1000, 12.0),
    }
    assert all(e.severity is Severity.CRITICAL and e.baseline is None for e in at_nan.events)
    for layer in ("", "layer_1"):  # the series whose norm was NaN
        assert at_nan.state.baseline(layer) == before.baseline(layer)
    assert [(e.layer, e.first_step) for e in _explosions(store)] == [
        ("", 2000),
        ("layer_1", 2000),
        ("", 2500),
        ("layer_1", 2500),
    ]
    assert not any(math.isnan(e.value) for e in store.events)


def test_detect_layer_infinity_from_an_overflowed_norm_is_a_critical_explosion():
    norms = _lognormal(6, 200, 2)
    norms[150, 0] = np.inf  # finite gradient values, sum of squares overflowed: count 0

    store = _feed(_columns(0, norms), DetectorConfig())

    events = {(e.rule, e.layer): e for e in store.events}
    assert events[Rule.EXPLOSION, "layer_0"].value == math.inf
    assert events[Rule.EXPLOSION, "layer_0"].severity is Severity.CRITICAL
    assert (Rule.NONFINITE, "") in events  # the global norm is +Inf on a step not skipped
    assert (Rule.NONFINITE, "layer_0") not in events  # no non-finite value was counted


def test_detect_ceiling_applies_during_warmup():
    norms = np.ones((20, 1))
    norms[5, 0] = 50.0
    config = _config(ceiling=10.0)

    result = detect(None, _columns(0, norms, global_norm=np.ones(20)), config)

    assert [(e.layer, e.first_step, e.severity, e.baseline) for e in result.events] == [
        ("layer_0", 5, Severity.CRITICAL, 10.0)
    ]


@pytest.mark.parametrize("jitter", [0.0, 1e-6])
def test_detect_constant_norms_raise_nothing(jitter):
    rng = np.random.default_rng(7)
    steps = 12_000
    scale = np.array([1.0, 3e-3, 250.0, 1e-5])
    norms = scale * (1.0 + jitter * rng.standard_normal((steps, 4)))

    store = _feed(_columns(0, norms), DetectorConfig(), batch=200)

    assert store.events == []
    assert store.triggers == {}


def _noise(sigma: float, factor: float = 1.0) -> Callable[..., np.ndarray]:
    def make(rng: np.random.Generator, steps: int, width: int) -> np.ndarray:
        trend = np.linspace(0.0, math.log(factor), steps)[:, None]
        return np.exp(trend + sigma * rng.standard_normal((steps, width)))

    return make


_HEALTHY = {
    "lognormal σ0.3": _noise(0.3),
    "lognormal σ0.5": _noise(0.5),
    "lognormal σ1.0": _noise(1.0),
    "drift ×10 up, σ0.3": _noise(0.3, 10.0),
    "drift ×100 down, σ0.5": _noise(0.5, 0.01),
    "AR(1) φ0.9 σ1.0": ar1_norms(0.9, 1.0),
    "AR(1) φ0.99 σ0.3": ar1_norms(0.99, 0.3),
    "AR(1) φ0.99 σ0.5": ar1_norms(0.99, 0.5),
}


def test_detect_false_alarm_rate_on_healthy_runs_is_below_one_per_10k_steps():
    steps, width, seeds = 12_500, 16, 2
    config = DetectorConfig()
    events = series_steps = run_steps = 0
    for name, make in _HEALTHY.items():
        found = 0
        for seed in range(seeds):
            norms = make(np.random.default_rng(seed), steps, width)
            found += len(_feed(_columns(0, norms), config, batch=50).events)
        print(f"{name}: {found} events in {seeds * steps * (width + 1)} series-steps")
        events += found
        series_steps += seeds * steps * (width + 1)
        run_steps += seeds * steps
    per_series = events / series_steps * 1e4
    per_run = events / run_steps * 1e4
    print(
        f"false alarms: {events} events; {per_series:.4f} per 10k steps of a series, "
        f"{per_run:.3f} per 10k steps of a {width}-layer run ({run_steps} steps)"
    )
    assert run_steps >= 200_000
    assert per_series < 1.0
    assert per_run < 1.0


# --------------------------------------------------------------------------- other rules


def test_detect_vanishing_fires_after_exactly_n_consecutive_steps():
    config = DetectorConfig(
        thresholds=Thresholds(vanishing={"floor": 1e-3, "consecutive_steps": 10})
    )
    norms = np.ones((100, 2))
    norms[20:40, 0] = 1e-4  # 20 steps below the floor
    norms[60:70, 0] = 1e-4  # 10 steps, but one of them skipped (neutral): one short
    norms[70, 0] = np.nan  # neutral too: neither extends nor resets the streak
    norms[71:73, 0] = 1e-4  # ... so the streak reaches 10 and 11 here
    skipped = np.zeros(100, np.bool_)
    skipped[65] = True  # also neutral, though its norm is below the floor

    store = _feed(_columns(0, norms, global_norm=np.ones(100), skipped=skipped), config)

    vanishing = [e for e in store.events if e.rule is Rule.VANISHING]
    assert [(e.layer, e.first_step, e.last_step, e.count) for e in vanishing] == [
        ("layer_0", 29, 72, 11 + 2)
    ]
    assert vanishing[0].severity is Severity.WARNING
    assert vanishing[0].baseline == 1e-3
    assert vanishing[0].value == pytest.approx(1e-4)


def test_detect_vanishing_streak_spans_batches():
    config = DetectorConfig(
        thresholds=Thresholds(vanishing={"floor": 1e-3, "consecutive_steps": 10}, cooldown_steps=0)
    )
    norms = np.full((30, 1), 1e-4)

    store = _feed(_columns(0, norms, global_norm=np.ones(30)), config, batch=4)

    first = [e.first_step for e in store.events if e.rule is Rule.VANISHING]
    assert first == list(range(9, 30))


@pytest.mark.parametrize("batch", [1, 7, 50])
def test_detect_clip_rate_fires_exactly_at_the_window_edge(batch):
    config = DetectorConfig(
        thresholds=Thresholds(clip_rate={"window_steps": 10, "max_fraction": 0.5}, cooldown_steps=1)
    )
    clip = np.ones(60, np.float32)
    clip[0:6] = 0.5  # 6 of the first 10: fires at step 9, when the window is first full
    clip[30:35] = 0.5  # 5 of 10: exactly the limit, never above it
    clip[45:50] = 0.5
    clip[50] = 0.9  # the 6th clipped step in the window 41..50, until 45 leaves it at 55
    clip[51] = np.nan  # not clipped

    store = _feed(_columns(0, np.ones((60, 1)), clip_coef=clip), config, batch=batch)

    rate = [(e.first_step, e.last_step, e.count, e.value, e.baseline) for e in store.events]
    assert rate == [(9, 9, 1, 0.6, 0.5), (50, 54, 5, 0.6, 0.5)]
    assert all(e.rule is Rule.CLIP_RATE and e.layer == "" for e in store.events)


def test_detect_skipped_overflow_steps_raise_nothing():
    norms = _lognormal(8, 600, 3)
    global_norm = np.sqrt((norms**2).sum(axis=1))
    skipped = np.zeros(600, np.bool_)
    for step in (150, 151, 152, 400):
        norms[step] = np.nan
        global_norm[step] = np.nan
        skipped[step] = True
    norms[300] = np.inf
    global_norm[300] = np.inf
    skipped[300] = True
    columns = _columns(0, norms, global_norm=global_norm, skipped=skipped)

    store = _feed(columns, DetectorConfig())
    clean = _feed(
        _columns(0, np.delete(_lognormal(8, 600, 3), [150, 151, 152, 300, 400], 0)),
        DetectorConfig(),
    )

    assert store.events == []
    assert store.triggers == {}
    for layer in ("", "layer_0", "layer_1", "layer_2"):
        assert store.state.baseline(layer) == clean.state.baseline(layer)


# --------------------------------------------------------------------------- cooldown


def test_detect_cooldown_merges_triggers_within_batches_and_across_them():
    norms = _lognormal(9, 2000, 1)
    for step in (1000, 1090, 1180):  # each within 100 steps of the previous one
        norms[step, 0] *= 10.0
    norms[1400, 0] *= 100.0  # 220 steps later: a new event
    columns = _columns(0, norms, global_norm=np.ones(2000))
    config = DetectorConfig()

    whole = _feed(columns, config, batch=2000)
    split = _Store()
    split.feed(_slice(columns, 0, 1100), config)
    second = split.feed(_slice(columns, 1100, 2000), config)

    expected = [(1000, 1180, 3, Severity.WARNING), (1400, 1400, 1, Severity.CRITICAL)]
    assert [(e.first_step, e.last_step, e.count, e.severity) for e in whole.events] == expected
    assert [(e.first_step, e.continues) for e in second.events] == [(1180, True), (1400, False)]
    assert split.events == whole.events


def test_detection_merged_keeps_the_highest_severity_and_the_peak():
    first = Detection(
        Rule.EXPLOSION, "a", Severity.CRITICAL, 10, 12, 2, 500.0, 2.0, continues=False
    )
    later = Detection(Rule.EXPLOSION, "a", Severity.WARNING, 20, 30, 3, 900.0, 3.0, continues=True)

    merged = first.merged(later)

    assert merged == Detection(
        Rule.EXPLOSION, "a", Severity.CRITICAL, 10, 30, 5, 900.0, 3.0, continues=False
    )
    low = Detection(Rule.VANISHING, "a", Severity.WARNING, 1, 2, 2, 1e-9, 1e-7, continues=False)
    lower = Detection(Rule.VANISHING, "a", Severity.WARNING, 3, 3, 1, 1e-8, 1e-7, continues=True)
    assert low.merged(lower).value == 1e-9
    with pytest.raises(ValueError, match="same rule"):
        first.merged(low)


def test_severity_orders_critical_above_warning():
    assert Severity.CRITICAL > Severity.WARNING
    assert max(Severity.WARNING, Severity.CRITICAL) is Severity.CRITICAL
    assert sorted([Severity.CRITICAL, Severity.WARNING]) == [Severity.WARNING, Severity.CRITICAL]


# --------------------------------------------------------------------------- order and state


def test_detect_out_of_order_steps_skip_stateful_rules_but_not_nonfinite_or_ceiling():
    config = DetectorConfig(
        thresholds=Thresholds(explosion={"ceiling": 1000.0}, vanishing={"consecutive_steps": 1})
    )
    norms = _lognormal(10, 1000, 2)
    state = _feed(_columns(0, norms), config).state
    late = np.ones((50, 2))
    late[5, 0] = 50.0  # a 50× spike: statistical, so skipped on a late step
    late[6, 0] = 5000.0  # above the ceiling: still an explosion
    late[7, 1] = 0.0  # below the vanishing floor: skipped
    late[8, 1] = np.nan
    nonfinite = np.zeros((50, 2), np.int64)
    nonfinite[8, 1] = 4

    result = detect(state, _columns(500, late, nonfinite=nonfinite), config)

    assert {(e.rule, e.layer, e.first_step) for e in result.events} == {
        (Rule.EXPLOSION, "layer_0", 506),
        (Rule.EXPLOSION, "", 506),
        (Rule.NONFINITE, "layer_1", 508),
        (Rule.NONFINITE, "", 508),
    }
    assert result.state.last_step == 999
    for layer in ("", "layer_0", "layer_1"):
        assert result.state.baseline(layer) == state.baseline(layer)
    resumed = detect(result.state, _columns(1000, np.ones((1, 2))), config)
    assert resumed.events == []


def test_detect_new_layers_get_fresh_state_and_missing_layers_keep_theirs():
    config = DetectorConfig()
    norms = _lognormal(11, 1000, 2)
    first = detect(None, _columns(0, norms, layers=["a", "b"]), config).state
    second = detect(first, _columns(1000, _lognormal(12, 50, 2), layers=["b", "c"]), config).state

    assert second.series == ("", "a", "b", "c")
    assert second.baseline("a") == first.baseline("a")
    assert second.baseline("c") is not None
    spike = np.ones((1, 3))
    spike[0] = [1.0, 1.0, 1.0]
    spike[0, 0] = 10.0  # "a" kept its warm baseline; "c" is still warming up
    spike[0, 2] = 10.0
    result = detect(
        second, _columns(1050, spike, layers=["a", "b", "c"], global_norm=np.ones(1)), config
    )
    assert [e.layer for e in result.events if e.rule is Rule.EXPLOSION] == ["a"]


def test_detect_does_not_modify_its_input_state():
    config = DetectorConfig()
    state = detect(None, _columns(0, _lognormal(13, 300, 3)), config).state
    blob = state.to_bytes()
    spikes = _lognormal(14, 50, 4) * 100.0

    detect(state, _columns(300, spikes, layers=["layer_0", "layer_1", "layer_2", "new"]), config)

    assert state.to_bytes() == blob


def test_detector_state_round_trips_through_bytes():
    config = DetectorConfig(thresholds=Thresholds(clip_rate={"window_steps": 37}))
    norms = _lognormal(15, 400, 3)
    norms[200, 1] *= 100.0
    clip = np.where(np.random.default_rng(15).random(400) < 0.3, 0.5, 1.0)
    layers = ["dense/kernel+bias", "encoder/mha/query ü", "x" * 300]
    state = detect(None, _columns(0, norms, clip_coef=clip, layers=layers), config).state

    blob = state.to_bytes()
    again = DetectorState.from_bytes(blob)

    assert again == state
    assert again.to_bytes() == blob
    assert again.series == ("", *layers)
    assert again.last_step == 399
    assert DetectorState.from_bytes(DetectorState().to_bytes()) == DetectorState()
    assert len(blob) < 60 * len(again.series) + 200


def test_detector_state_from_bytes_rejects_unknown_versions_and_damage():
    blob = detect(None, _columns(0, _lognormal(16, 10, 2)), DetectorConfig()).state.to_bytes()

    with pytest.raises(StateFormatError, match="unsupported version 3"):
        DetectorState.from_bytes(blob[:4] + bytes([3]) + blob[5:])
    with pytest.raises(StateFormatError, match="magic"):
        DetectorState.from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(StateFormatError):
        DetectorState.from_bytes(blob[:-3])
    with pytest.raises(StateFormatError):
        DetectorState.from_bytes(b"GW")


def test_step_columns_reject_malformed_batches():
    with pytest.raises(ValueError, match="strictly increasing"):
        _columns(0, np.ones((3, 1)), steps=np.array([1, 3, 3]))
    with pytest.raises(ValueError, match="run-level"):
        _columns(0, np.ones((3, 1)), layers=[""])
    with pytest.raises(ValueError, match="grad_norm"):
        StepColumns(
            steps=np.arange(2),
            layers=("a", "b"),
            global_norm=np.ones(2),
            grad_norm=np.ones((2, 1)),
            nonfinite=np.zeros((2, 2), np.int64),
            clip_coef=np.ones(2),
            skipped=np.zeros(2, np.bool_),
        )


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"thresholds": {"explosion": {"z_threshold": 0}}}, "z_threshold"),
        ({"thresholds": {"explosion": {"z_threshold": "nan"}}}, "z_threshold"),
        ({"thresholds": {"explosion": {"min_ratio": 0.5}}}, "min_ratio"),
        ({"thresholds": {"explosion": {"ceiling": -1.0}}}, "ceiling"),
        ({"thresholds": {"explosion": {"ceiling": float("inf")}}}, "ceiling"),
        ({"thresholds": {"explosion": {"warmup_steps": 0}}}, "warmup_steps"),
        ({"thresholds": {"explosion": {"window_steps": 2.5}}}, "window_steps"),
        ({"thresholds": {"explosion": {"max_growth": 1.0}}}, "max_growth"),
        ({"thresholds": {"explosion": {"critical_ratio": 2.0}}}, "critical_ratio"),
        ({"thresholds": {"explosion": {"reject_z": 7.0}}}, "reject_z"),
        ({"thresholds": {"explosion": {"zthreshold": 5.0}}}, "zthreshold"),
        ({"thresholds": {"vanishing": {"floor": 0}}}, "floor"),
        ({"thresholds": {"vanishing": {"consecutive_steps": -3}}}, "consecutive_steps"),
        ({"thresholds": {"clip_rate": {"max_fraction": 0}}}, "max_fraction"),
        ({"thresholds": {"clip_rate": {"max_fraction": 1.5}}}, "max_fraction"),
        ({"thresholds": {"nonfinite": {"enabled": "yes"}}}, "enabled"),
        ({"thresholds": {"cooldown_steps": -1}}, "cooldown_steps"),
        ({"layers": [{"pattern": ""}]}, "pattern"),
        ({"layers": [{"pattern": "a*", "clip_rate": {}}]}, "clip_rate"),
        ({"layers": [{"pattern": "a*", "explosion": {"sigma_floor": 0}}]}, "sigma_floor"),
        ({"layers": [{"pattern": "a*", "explosion": {"min_ratio": 50}}]}, "critical_ratio"),
    ],
)
def test_detector_config_validation_errors_name_the_field(data, field):
    with pytest.raises(ValidationError) as caught:
        DetectorConfig.model_validate(data)

    assert field in str(caught.value)


def test_detector_config_resolve_first_match_wins_and_partial_fields_fall_back():
    config = DetectorConfig.model_validate(
        {
            "thresholds": {"explosion": {"z_threshold": 7.0}, "cooldown_steps": 50},
            "layers": [
                {"pattern": "encoder/*", "explosion": {"min_ratio": 5.0}},
                {"pattern": "encoder/attn*", "explosion": {"min_ratio": 2.0}},
                {"pattern": "*", "vanishing": {"enabled": False}, "cooldown_steps": 10},
            ],
        }
    )

    encoder = config.resolve("encoder/attn/query")
    assert encoder.explosion.min_ratio == 5.0  # the first match wins
    assert encoder.explosion.z_threshold == 7.0  # unset: the project's value
    assert encoder.explosion.critical_ratio == 30.0  # unset there too: the default
    assert encoder.cooldown_steps == 50
    other = config.resolve("decoder/dense")
    assert not other.vanishing.enabled
    assert other.vanishing.floor == 1e-7
    assert other.cooldown_steps == 10
    assert config.resolve("") == config.thresholds  # run level: project defaults only
    assert DetectorConfig.model_validate_json(config.model_dump_json()) == config
    assert config.model_dump(mode="json")["layers"][0]["pattern"] == "encoder/*"


def test_detect_applies_layer_overrides():
    config = DetectorConfig(
        layers=(
            LayerOverride(pattern="quiet/*", explosion={"enabled": False}),
            LayerOverride(pattern="tight/*", explosion={"min_ratio": 1.5, "z_threshold": 3.0}),
        )
    )
    norms = _lognormal(17, 1001, 3, sigma=0.05)
    norms[1000] *= 2.0
    layers = ["quiet/a", "tight/b", "plain/c"]

    result = detect(None, _columns(0, norms, layers=layers), config)

    assert [e.layer for e in result.events] == ["tight/b"]


# --------------------------------------------------------------------------- invariance


@st.composite
def _streams(draw):
    steps = draw(st.integers(200, 500))
    width = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    norms = np.exp(0.3 * rng.standard_normal((steps, width)))
    nonfinite = np.zeros((steps, width), np.int64)
    skipped = np.zeros(steps, np.bool_)
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["spike", "nan", "zero", "skip", "ramp", "inf"]))
        at = draw(st.integers(0, steps - 1))
        layer = draw(st.integers(0, width - 1))
        if kind == "spike":
            norms[at, layer] *= draw(st.sampled_from([5.0, 20.0, 1000.0]))
        elif kind == "nan":
            norms[at, layer] = np.nan
            nonfinite[at, layer] = draw(st.integers(1, 9))
        elif kind == "zero":
            norms[at : at + draw(st.integers(1, 40)), layer] = 0.0
        elif kind == "skip":
            norms[at] = np.nan
            skipped[at] = True
        elif kind == "ramp":
            norms[at:, layer] *= np.exp(0.05 * np.arange(steps - at))
        else:
            norms[at, layer] = np.inf
    norms = np.minimum(norms, 1e30)
    clip = np.where(rng.random(steps) < draw(st.floats(0.0, 1.0)), 0.5, 1.0)
    columns = _columns(0, norms, nonfinite=nonfinite, skipped=skipped, clip_coef=clip)
    cuts = sorted(draw(st.sets(st.integers(1, steps - 1), max_size=8)))
    return columns, [0, *cuts, steps]


_SMALL = DetectorConfig(
    thresholds=Thresholds(
        explosion={"warmup_steps": 20, "window_steps": 50, "level_steps": 20, "relearn_steps": 30},
        vanishing={"floor": 1e-3, "consecutive_steps": 5},
        clip_rate={"window_steps": 16, "max_fraction": 0.5},
        cooldown_steps=10,
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams())
def test_detect_batching_gives_the_same_events_and_state(stream):
    columns, cuts = stream
    whole = _Store()
    whole.feed(columns, _SMALL)

    split = _Store()
    for start, stop in itertools.pairwise(cuts):
        split.feed(_slice(columns, start, stop), _SMALL, via_bytes=True)

    assert split.events == whole.events
    assert split.triggers == whole.triggers
    assert split.state == whole.state
    assert split.state.to_bytes() == whole.state.to_bytes()
    assert not any(math.isnan(e.value) for e in whole.events)
