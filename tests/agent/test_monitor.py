"""GradientMonitor through real ``model.fit`` runs and a custom loop."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor, MonitoredOptimizer, clip
from tests.agent.models import regression_data, small_model


def _data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return regression_data(n, seed)


def _monitor(transport, **kwargs) -> GradientMonitor:
    return GradientMonitor(run="test", transport=transport, **kwargs)


@pytest.mark.parametrize(
    ("jit", "steps_per_execution"), [(False, 1), (True, 1), (False, 4), (True, 3)]
)
def test_fit_records_every_step_once_in_order(transport, jit, steps_per_execution):
    x, y = _data(n=100)  # 13 batches of 8 per epoch: the last execution is partial
    model = small_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss="mse",
        jit_compile=jit,
        steps_per_execution=steps_per_execution,
    )
    monitor = _monitor(transport, flush_every=5)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[monitor])
    assert monitor.close(timeout_seconds=10)
    assert transport.steps() == list(range(26))
    assert transport.batches[0]["layers"] == ["net/hidden", "net/out"]
    assert transport.statuses[-1] == "finished"
    assert monitor.lost_steps == 0
    assert monitor.dropped_batches == {}


def test_fit_with_global_norm_policy_matches_keras_global_clipnorm(transport):
    # Same rule; the norm is summed per layer first, so agreement is to float32 rounding.
    x, y = _data()
    reference = small_model()
    reference.compile(optimizer=keras.optimizers.Adam(0.05, global_clipnorm=0.1), loss="mse")
    reference.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)

    model = small_model()
    monitor = _monitor(transport, policy=clip.global_norm(0.1), flush_every=4)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=[monitor])
    monitor.close()
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    clipped = transport.column("global_norm_clipped")
    before = transport.column("global_norm")
    assert np.all(clipped <= np.float32(0.1) * (1 + 1e-6))
    np.testing.assert_allclose(
        transport.column("clip_coef"), np.minimum(1, 0.1 / before), rtol=1e-6
    )


def test_fit_restores_optimizer_so_saved_model_loads_without_gradwatch(transport, tmp_path):
    x, y = _data()
    model = small_model()
    adam = keras.optimizers.Adam(0.01)
    model.compile(optimizer=adam, loss="mse")
    monitor = _monitor(transport, policy=clip.global_norm(1.0))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    monitor.close()
    assert model.optimizer is adam
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    assert type(loaded.optimizer) is keras.optimizers.Adam
    np.testing.assert_array_equal(loaded.optimizer.iterations.numpy(), adam.iterations.numpy())
    # Training again without the monitor uses the plain optimizer.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert transport.steps() == list(range(6))


def test_fit_records_loss_of_each_step(transport):
    x, y = _data(n=32)
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # weights never change
    monitor = _monitor(transport, flush_every=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[monitor])
    monitor.close()
    expected = [
        float(np.mean((model.predict(x[i : i + 8], verbose=0) - y[i : i + 8]) ** 2))
        for i in range(0, 32, 8)
    ]
    assert transport.column("loss_known").all()
    np.testing.assert_allclose(transport.column("loss"), expected, rtol=1e-5)


def test_explicit_wrap_in_compile_records_and_stays_installed(transport):
    x, y = _data(n=32)
    model = small_model()
    monitor = _monitor(transport, flush_every=3)
    wrapped = monitor.wrap(keras.optimizers.SGD(0.01))
    model.compile(optimizer=wrapped, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    monitor.close()
    assert model.optimizer is wrapped
    assert transport.steps() == list(range(8))
    assert wrapped.iterations.numpy() == 8


def test_global_norm_policy_zeroes_a_nonfinite_gradient_instead_of_poisoning_weights(transport):
    model = small_model()
    monitor = _monitor(transport, policy=clip.global_norm(1.0), flush_every=1)
    optimizer = monitor.wrap(keras.optimizers.SGD(0.1))
    model.build((None, 6))
    optimizer.build(model.trainable_variables)
    before = [w.copy() for w in model.get_weights()]
    grads = [
        tf.fill(v.shape, np.float32(np.nan)) if i == 0 else tf.ones(v.shape)
        for i, v in enumerate(model.trainable_variables)
    ]
    monitor.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    monitor.on_step()
    monitor.close()
    # SGD with a zero gradient leaves the weights exactly as they were.
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isnan(transport.column("global_norm")[0])
    assert transport.column("clip_coef").tolist() == [0.0]
    assert transport.column("global_norm_clipped").tolist() == [0.0]
    assert transport.column("nonfinite")[0].tolist() == [48, 0]
    assert transport.column("skipped").tolist() == [False]


def test_custom_training_loop_in_tf_function(transport):
    x, y = _data(n=40)
    model = small_model()
    monitor = _monitor(transport, flush_every=4, policy=clip.global_norm(0.5))
    optimizer = monitor.wrap(keras.optimizers.SGD(0.01))
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.apply_gradients(zip(grads, model.trainable_variables, strict=False), loss=loss)
        return loss

    model.build((None, 6))
    optimizer.build(model.trainable_variables)
    losses = []
    for i in range(0, 40, 4):
        losses.append(float(train_step(x[i : i + 4], y[i : i + 4])))
        monitor.on_step()
    assert monitor.close()
    assert transport.steps() == list(range(10))
    np.testing.assert_allclose(transport.column("loss"), losses, rtol=1e-6)
    assert isinstance(optimizer, MonitoredOptimizer)


def test_wrap_rejects_loss_scale_optimizer(transport):
    monitor = _monitor(transport)
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    with pytest.raises(ValueError, match=r"^optimizer:"):
        monitor.wrap(lso)
    monitor.close()


@pytest.mark.parametrize(("max_incidents", "jit"), [(0, False), (1, False), (1, True)])
def test_repeated_fit_with_callback_reuses_its_trace(transport, monkeypatch, max_incidents, jit):
    """One trace per monitor, also with incident capture on (under XLA a rolling one): the
    variables it creates at its first trace are made eagerly, so tf.function does not trace
    the whole step a second time (which doubled the time to the first step)."""
    traces = []
    original = MonitoredOptimizer.apply

    def counting_apply(self, grads, trainable_variables=None):
        traces.append(1)  # Python runs only while tracing
        return original(self, grads, trainable_variables)

    monkeypatch.setattr(MonitoredOptimizer, "apply", counting_apply)
    x, y = _data(n=32)
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit)
    monitor = _monitor(transport, flush_every=3, max_incidents=max_incidents)
    for _ in range(3):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
        assert type(model.optimizer) is keras.optimizers.SGD
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # unmonitored: the plain function
    monitor.close()
    assert len(traces) == 1
    assert transport.steps() == list(range(12))
