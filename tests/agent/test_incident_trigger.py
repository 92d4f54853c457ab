"""The in-graph explosion trigger equals the server's critical explosion rule on the global
norm, step for step (the reference: ``gradwatch.server.detect.rules.explosion_triggers`` with
the default thresholds), in eager, graph and XLA execution."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent.incident_trigger import ExplosionWatch
from gradwatch.server.detect.config import DetectorConfig
from gradwatch.server.detect.rules import explosion_triggers, resolve_params
from gradwatch.server.detect.state import NO_STEP


def _series(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1,500 steps of a wandering log-normal norm with single-step spikes (×10 to ×10⁴), a
    slow exponential blow-up, a permanent level shift, NaN steps and skipped steps."""
    rng = np.random.default_rng(seed)
    n = 1500
    log_norm = np.cumsum(rng.normal(0, 0.02, n)) + rng.normal(0, 0.15, n)
    for step, factor in ((150, 1e3), (300, 10.0), (420, 40.0), (700, 1e4), (710, 50.0)):
        log_norm[step] += np.log(factor)
    log_norm[900:1000] += np.linspace(0.0, 6.0, 100)  # ×400 over 100 steps
    log_norm[1100:] += np.log(60.0)  # a new level: one event, then re-learnt
    norm = np.exp(log_norm).astype(np.float32).astype(np.float64)
    norm[[50, 500, 1200]] = np.nan
    skipped = np.zeros(n, bool)
    skipped[[420, 800]] = True
    return norm, skipped


def _server_critical(norm: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    params = resolve_params(DetectorConfig(), [])
    steps = np.arange(len(norm), dtype=np.int64)
    zeros_f, zeros_i = np.zeros(1), np.zeros(1, np.int64)
    triggers = explosion_triggers(
        norm[:, None], np.zeros((len(norm), 1), np.int64), np.ones(len(norm), bool), skipped,
        params, zeros_i.copy(), zeros_f.copy(), zeros_f.copy(), zeros_f.copy(), zeros_i.copy(),
        np.zeros(1, np.int64), steps, np.zeros((len(norm), 1), bool),
        np.full(1, NO_STEP, np.int64),
    )  # fmt: skip
    return triggers.critical[:, 0]


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("seed", [0, 1])
def test_trigger_fires_exactly_where_the_server_calls_an_explosion_critical(mode, seed):
    norm, skipped = _series(seed)
    expected = _server_critical(norm, skipped)
    assert expected.sum() >= 3  # the series exercises the rule

    watch = ExplosionWatch()
    watch.build()

    def run(values: tf.Tensor, flags: tf.Tensor) -> tf.Tensor:
        fired = tf.TensorArray(tf.bool, size=len(norm))
        for i in tf.range(len(norm)) if mode != "eager" else range(len(norm)):
            fired = fired.write(i, watch.update(values[i], flags[i]))
        return fired.stack()

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    got = run(tf.constant(norm, tf.float32), tf.constant(skipped)).numpy()
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(expected))
