"""tf.train.Checkpoint carries the monitor's step counter and policy state; model.save loads."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent import GradientMonitor, clip
from tests.agent.conftest import RecordingTransport


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, (x @ rng.normal(size=(6, 1))).astype("float32")


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _monitor(transport):
    return GradientMonitor(
        run="ckpt", transport=transport, flush_every=3, policy=clip.zclip(warmup_steps=3)
    )


def test_checkpoint_restored_before_training_continues_steps_and_policy_state(tmp_path):
    x, y = _data()
    first = RecordingTransport()
    model, monitor = _model(), _monitor(first)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[monitor])
    monitor.close()
    path = tf.train.Checkpoint(model=model, monitor=monitor).save(str(tmp_path / "ckpt"))
    saved_state = {v.name: v.numpy() for v in monitor._checkpointed.policy.variables}

    resumed = RecordingTransport()
    model2, monitor2 = _model(), _monitor(resumed)
    status = tf.train.Checkpoint(model=model2, monitor=monitor2).restore(path)
    # Restored when the monitor builds its state at the start of fit (deferred restore).
    model2.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor2])
    monitor2.close()
    status.assert_existing_objects_matched()
    assert first.steps() == list(range(12))
    assert resumed.steps() == [12, 13, 14, 15]

    # The same run continued in one process gives the same thresholds: nothing warmed up again.
    continued = RecordingTransport()
    model3, monitor3 = _model(), _monitor(continued)
    model3.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[monitor3])
    monitor3.close()
    np.testing.assert_allclose(
        resumed.column("global_norm_clipped"),
        continued.column("global_norm_clipped")[12:],
        rtol=1e-5,
    )
    assert saved_state  # the policy had state to save


def test_checkpoint_restored_after_build_keeps_reading_the_ring(tmp_path):
    x, y = _data()
    source = RecordingTransport()
    model, monitor = _model(), _monitor(source)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    monitor.close()
    path = tf.train.Checkpoint(model=model, monitor=monitor).save(str(tmp_path / "ckpt"))

    transport = RecordingTransport()
    model2, monitor2 = _model(), _monitor(transport)
    model2.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor2])
    tf.train.Checkpoint(model=model2, monitor=monitor2).restore(path)
    model2.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor2])
    monitor2.close()
    assert transport.steps() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_model_saved_with_explicit_wrap_loads_as_the_plain_optimizer(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    monitor = GradientMonitor(run="save", transport=RecordingTransport())
    model.compile(optimizer=monitor.wrap(keras.optimizers.Adam(0.01)), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    monitor.close()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # gradwatch imported: no custom_objects
    assert type(loaded.optimizer) is keras.optimizers.Adam
    assert loaded.optimizer.iterations.numpy() == 8
    for got, want in zip(
        loaded.optimizer.variables, model.optimizer.inner_optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
