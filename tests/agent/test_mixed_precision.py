"""mixed_float16 with Keras' LossScaleOptimizer: unscaled norms; overflow steps are skips."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradwatch.agent import GradientMonitor, MonitoredOptimizer


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, (x @ rng.normal(size=(6, 1))).astype("float32")


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )


def _fit(optimizer, monitor, x, y, epochs=1):
    model = _model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, callbacks=[monitor])
    monitor.close()
    return model


def test_mixed_precision_norms_are_of_the_unscaled_gradient(transport, mixed_float16):
    x, y = _data()
    monitor = GradientMonitor(run="mp", transport=transport, flush_every=2)
    # LSO → gradwatch → SGD, the order compile also makes around a wrapped optimizer;
    # a modest scale so that no step overflows float16 here.
    optimizer = keras.optimizers.LossScaleOptimizer(
        monitor.wrap(keras.optimizers.SGD(0.0)), initial_scale=2.0**8
    )
    model = _fit(optimizer, monitor, x, y)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, MonitoredOptimizer)
    keras.mixed_precision.set_dtype_policy("float32")
    reference = RecordingTransportLike()
    float32 = GradientMonitor(run="fp32", transport=reference, flush_every=2)
    _fit(keras.optimizers.SGD(0.0), float32, x, y)
    # Same weights (lr 0), so the norms agree to float16 precision, not 32768× larger.
    np.testing.assert_allclose(
        transport.column("global_norm"), reference.column("global_norm"), rtol=2e-3
    )
    np.testing.assert_allclose(transport.column("loss"), reference.column("loss"), rtol=2e-3)
    assert not transport.column("skipped").any()


def test_loss_scale_overflow_is_reported_as_skipped_not_as_explosion(transport, mixed_float16):
    x, y = _data()
    monitor = GradientMonitor(run="mp", transport=transport, flush_every=3)
    # A scale of 2**30 overflows float16 at first; the LSO halves it and skips each time.
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**30)
    model = _fit(lso, monitor, x, y, epochs=4)
    assert model.optimizer is lso  # the callback installed the wrapper inside and left
    assert type(lso.inner_optimizer) is keras.optimizers.SGD
    assert "scale_loss" not in vars(lso)  # hooks removed
    skipped = transport.column("skipped")
    assert transport.steps() == list(range(16))
    assert skipped[:3].all()
    assert not skipped.all()
    norms = transport.column("global_norm")
    assert np.isnan(norms[skipped]).all()  # unmeasurable, not Inf
    assert np.isfinite(norms[~skipped]).all()
    assert (transport.column("nonfinite")[skipped] == 0).all()
    assert transport.column("loss_known").all()
    assert np.isfinite(transport.column("loss")).all()
    # The weights only moved on the applied steps.
    assert lso.inner_optimizer.iterations.numpy() == int((~skipped).sum())


class RecordingTransportLike:
    """Same as the conftest fixture, for a second monitor in one test."""

    def __new__(cls):
        from tests.agent.conftest import RecordingTransport

        return RecordingTransport()
