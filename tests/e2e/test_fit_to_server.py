"""From ``model.fit`` to stored rows, the REST API and /metrics, over real sockets."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.agent import GradientMonitor

pytestmark = pytest.mark.e2e

BATCH, SAMPLES, EPOCHS, LR = 16, 80, 3, 0.05
STEPS = EPOCHS * SAMPLES // BATCH  # 15


def _model() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(12, activation="relu", name="dense_in"),
            keras.layers.Dense(6, activation="tanh", name="dense_mid"),
            keras.layers.Dense(1, name="dense_out"),
        ],
        name="e2e",
    )


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(SAMPLES, 5)).astype("float32")
    y = np.sin(x.sum(axis=1, keepdims=True)).astype("float32")
    return x, y


def _reference_norms(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Replay the same training with a GradientTape; per-layer and global norms in float64."""
    model = _model()
    optimizer = keras.optimizers.SGD(LR)
    loss_fn = keras.losses.MeanSquaredError()
    layer_norms, global_norms = [], []
    for _ in range(EPOCHS):
        for i in range(0, SAMPLES, BATCH):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i : i + BATCH], model(x[i : i + BATCH], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            squares = [float(np.sum(np.square(g.numpy().astype(np.float64)))) for g in grads]
            per_layer = [math.sqrt(squares[j] + squares[j + 1]) for j in range(0, len(squares), 2)]
            layer_norms.append(per_layer)
            global_norms.append(math.sqrt(sum(squares)))
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=False))
    return np.array(layer_norms), np.array(global_norms)


def test_fit_streams_every_step_of_every_layer_exactly_once(server, api):
    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    with GradientMonitor(run="e2e", server=server.url, project="tests", flush_every=4) as monitor:
        model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[monitor]
        )
        assert monitor.flush(timeout_seconds=30)
    assert monitor.dropped_batches == {}
    want_layers, want_global = _reference_norms(x, y)

    run = api.get(f"/api/v1/runs/{monitor.run_id}").json()
    assert run["name"] == "e2e"
    assert run["project"] == "tests"
    assert run["status"] == "finished"
    assert run["num_steps"] == STEPS
    assert run["last_step"] == STEPS - 1

    layers = api.get(f"/api/v1/runs/{monitor.run_id}/layers").json()["layers"]
    names = [layer["name"] for layer in layers]
    assert names == ["e2e/dense_in", "e2e/dense_mid", "e2e/dense_out"]
    for index, name in enumerate(names):
        series = api.get(
            f"/api/v1/runs/{monitor.run_id}/series", params={"metric": "grad_norm", "layer": name}
        ).json()
        assert series["downsampled"] is False
        assert series["step"] == list(range(STEPS)), name  # every step, exactly once
        np.testing.assert_allclose(series["value"], want_layers[:, index], rtol=1e-5)
        assert layers[index]["max_grad_norm"] == pytest.approx(max(series["value"]))

    global_series = api.get(
        f"/api/v1/runs/{monitor.run_id}/series", params={"metric": "global_norm"}
    ).json()
    assert global_series["step"] == list(range(STEPS))
    np.testing.assert_allclose(global_series["value"], want_global, rtol=1e-5)

    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    info = [
        s for s in families["gradwatch_run_info"].samples if s.labels["run_id"] == monitor.run_id
    ]
    assert info
    assert info[0].labels["name"] == "e2e"
    assert info[0].value == 1
    step = [
        s.value
        for s in families["gradwatch_run_step"].samples
        if s.labels["run_id"] == monitor.run_id
    ]
    assert step == [STEPS - 1]
    norm = [
        s.value
        for s in families["gradwatch_global_grad_norm"].samples
        if s.labels["run_id"] == monitor.run_id
    ]
    assert norm == [pytest.approx(want_global[-1], rel=1e-5)]


def test_resent_batches_are_stored_once(server, api):
    """The agent's retry after a lost reply must not duplicate steps."""
    from gradwatch.agent.transport import HttpTransport

    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    sent: list[dict] = []

    class Resending(HttpTransport):
        def send_batch(self, run_id, batch):
            super().send_batch(run_id, batch)
            sent.append(batch)
            super().send_batch(run_id, batch)  # as if the first reply had been lost

    with GradientMonitor(
        run="resend", server=server.url, flush_every=6, transport=Resending(server.url)
    ) as monitor:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    series = api.get(
        f"/api/v1/runs/{monitor.run_id}/series",
        params={"metric": "grad_norm", "layer": "e2e/dense_out"},
    ).json()
    assert series["step"] == list(range(SAMPLES // BATCH))
    assert len(sent) == 1
