"""When a step with a finite gradient is an explosion: the server's critical explosion rule
on the global norm, estimated inside the train step, so the step can be captured before its
update (the server's verdict arrives a batch later, after the state has moved on).

The rule is :mod:`gradwatch.server.detect.rules`' explosion rule for one series, with its
default thresholds (a server's per-project thresholds are not known to the agent): in log
space, a level ``mu`` (EMA, span 300 samples) and a scale ``var`` (EMA of squared
deviations, span 1000), ``sigma = max(sqrt(var), 0.1)``; a baseline ``b`` that follows ``mu``
down at once and up by at most ``log(4)/1000`` per sample; a sample (a finite, positive norm
of a step the policy did not skip) explodes when, after 200 samples, ``z = (log(norm) - b) /
sigma >= 6`` and ``norm >= 30 exp(b)`` (the server's *critical* ratio, so a capture is
spent only on what the server would call critical). A sample more than 3 sigma out never
updates the baseline (winsorised during warm-up); 500 rejected samples in a row re-learn the
level. The first samples are averaged with weight ``1/(n+1)``.

About 30 scalar operations a step, no branch. Not thread-safe: the training thread owns it.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from .clip.base import state_variable

__all__ = ["ExplosionWatch"]

Z_THRESHOLD = 6.0
LOG_CRITICAL_RATIO = math.log(30.0)
WARMUP = 200
ALPHA_MU = 2.0 / (300 + 1)
ALPHA_VAR = 2.0 / (1000 + 1)
REJECT_Z = 3.0
SIGMA_FLOOR = 0.1
GROWTH = math.log(4.0) / 1000.0
RELEARN = 500


class ExplosionWatch:
    """The global norm's baseline, kept in variables made eagerly by :meth:`build`."""

    def __init__(self) -> None:
        self._state: list[tf.Variable] = []

    def build(self) -> None:
        """Create the state (call under ``tf.init_scope`` or eagerly; once)."""
        if self._state:
            return
        names = ("n", "mu", "var", "base", "rejected")
        # Mirrored under tf.distribute: every replica judges the same all-reduced norm.
        self._state = [state_variable(0.0, tf.float64, f"explosion_{name}") for name in names]

    def update(self, global_norm: Any, skipped: Any) -> tf.Tensor:
        """In-graph: judge this step's norm against the baseline, then learn from it.

        Args:
            global_norm: The step's global gradient norm before the policy (scalar).
            skipped: Whether the policy skipped the step (its norm is judged, not learnt).

        Returns:
            Scalar bool: the step is a critical explosion.
        """
        n_var, mu_var, var_var, base_var, rejected_var = self._state
        n, mu, var, base, rejected = (v.read_value() for v in self._state)
        norm = tf.cast(global_norm, tf.float64)
        positive = tf.logical_and(tf.math.is_finite(norm), norm > 0.0)
        one = tf.ones_like(norm)
        zero = tf.zeros_like(norm)
        x = tf.math.log(tf.where(positive, norm, one))
        sigma = tf.maximum(tf.sqrt(var), SIGMA_FLOOR)
        deviation = x - base
        z = deviation / sigma
        warm = n >= WARMUP
        fire = positive & warm & (z >= Z_THRESHOLD) & (deviation >= LOG_CRITICAL_RATIO)
        learn = positive & tf.logical_not(tf.cast(skipped, tf.bool))
        reject = learn & ((z > REJECT_Z) & warm | fire)
        accept = learn & tf.logical_not(reject)
        limit = REJECT_Z * sigma
        first = accept & (n == 0.0)
        delta = tf.where(first, zero, tf.clip_by_value(x - mu, -limit, limit))
        mu = tf.where(first, x, mu)
        fresh = 1.0 / (n + 1.0)
        weight = tf.cast(accept, tf.float64)
        weight_mu = weight * tf.maximum(fresh, ALPHA_MU)
        weight_var = weight * tf.maximum(fresh, ALPHA_VAR)
        mu = mu + weight_mu * delta
        var = (1.0 - weight_var) * (var + weight_var * delta * delta)
        n = n + weight
        capped = tf.where(n <= WARMUP, mu, tf.minimum(mu, base + GROWTH))
        base = tf.where(accept, capped, base)
        rejected = (rejected + tf.cast(reject, tf.float64)) * (1.0 - weight)
        relearn = rejected >= RELEARN
        mu = tf.where(relearn, x, mu)
        base = tf.where(relearn, tf.minimum(x, base + RELEARN * GROWTH), base)
        rejected = tf.where(relearn, zero, rejected)
        for variable, value in zip(
            (n_var, mu_var, var_var, base_var, rejected_var),
            (n, mu, var, base, rejected),
            strict=True,
        ):
            variable.assign(value)
        return fire
