"""MirroredStrategy over two logical CPUs gives the single-device result.

Two replicas, each with half of every batch: gradwatch measures, clips and
decides on the all-reduced gradient, so the weights and the reported norms
match a one-device run. Stock Keras clipping does not (it clips each replica's
gradient before the all-reduce).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor, clip


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 6)).astype("float32")  # 20 steps of 16
    y = (x @ rng.normal(size=(6, 1)) + 0.5 * rng.normal(size=(320, 1))).astype("float32")
    return x, y


def _fit(strategy, policy, transport, x, y, optimizer=None):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=optimizer or keras.optimizers.Adam(0.05), loss="mse")
    callbacks = []
    if transport is not None:
        monitor = GradientMonitor(run="dist", transport=transport, policy=policy, flush_every=6)
        callbacks.append(monitor)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    for callback in callbacks:
        callback.close()
    return model.get_weights()


POLICIES = {
    "global_norm": lambda: clip.global_norm(1.0),
    "layer_norm": lambda: clip.layer_norm(0.5),
    "zclip": lambda: clip.zclip(warmup_steps=5),
    "skip_nonfinite": lambda: clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0)),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_mirrored_strategy_matches_single_device(name, transport, mirrored):
    from tests.agent.conftest import RecordingTransport

    x, y = _data()
    single = RecordingTransport()
    want = _fit(tf.distribute.get_strategy(), POLICIES[name](), single, x, y)
    got = _fit(mirrored, POLICIES[name](), transport, x, y)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    assert transport.steps() == single.steps() == list(range(20))
    for column in ("global_norm", "global_norm_clipped", "grad_norm", "loss"):
        np.testing.assert_allclose(
            transport.column(column), single.column(column), rtol=1e-5, err_msg=column
        )


def test_mirrored_nan_on_one_replica_skips_the_step_on_every_replica(transport, mirrored):
    x, y = _data()
    x[3 * 16 + 12, 0] = np.nan  # step 3, second half of the batch: replica 1 only
    policy = clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0))
    weights = _fit(mirrored, policy, transport, x, y)
    assert all(np.isfinite(w).all() for w in weights)
    skipped = transport.column("skipped")
    assert skipped.tolist() == [i == 3 for i in range(20)]
    assert transport.column("nonfinite")[3].sum() > 0


def test_stock_keras_clipping_differs_under_mirrored_strategy_where_gradwatch_does_not(mirrored):
    # One weight, gradient 10 per example: Keras clips each replica's gradient (5 after its
    # 1/N loss scaling) to 1 and then sums, so 2 replicas move w by 2; one device by 1.
    x = np.ones((2, 1), np.float32)
    y = np.full((2, 1), -5.0, np.float32)  # d/dw (w·1 + 5)² at w = 0 is 10

    def fit(strategy, wrapped):
        with strategy.scope():
            model = keras.Sequential(
                [
                    keras.Input((1,)),
                    keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
                ]
            )
            if wrapped:
                monitor = GradientMonitor(run="k", transport=_Null(), policy=clip.global_norm(1.0))
                model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(1.0)), loss="mse")
            else:
                model.compile(optimizer=keras.optimizers.SGD(1.0, global_clipnorm=1.0), loss="mse")
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
        return float(model.get_weights()[0][0, 0])

    assert fit(tf.distribute.get_strategy(), wrapped=False) == pytest.approx(-1.0)
    assert fit(mirrored, wrapped=False) == pytest.approx(-2.0)  # the threshold grew with N
    assert fit(tf.distribute.get_strategy(), wrapped=True) == pytest.approx(-1.0)
    assert fit(mirrored, wrapped=True) == pytest.approx(-1.0)


class _Null:
    def create_run(self, run):
        pass

    def send_batch(self, run_id, batch):
        pass

    def set_status(self, run_id, status):
        pass

    def close(self):
        pass
