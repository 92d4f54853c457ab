"""Per-layer weight norm and update ratio ‖Δw‖/‖w‖, through ``model.fit`` and a custom loop.

Reference: the weights read from the model before and after each step (a
callback), grouped per layer and summed in quadrature in float64 NumPy;
w is the weight after the update, Δw = w_after − w_before.
"""

from __future__ import annotations

import itertools
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor, clip

BATCH, STEPS = 16, 8


def _data(n: int = BATCH * STEPS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.3 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def _model(constraint: Any = None) -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", kernel_constraint=constraint),
            keras.layers.Dense(1),
        ]
    )


class _Weights(keras.callbacks.Callback):
    """The model's weights before the first step and after every step (host reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[list[np.ndarray]] = []

    def on_train_begin(self, logs: Any = None) -> None:
        self.snapshots.append(self._read())

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.snapshots.append(self._read())

    def _read(self) -> list[np.ndarray]:
        return [v.numpy().astype(np.float64) for v in self.model.trainable_variables]


def _layer_norms(arrays: list[np.ndarray], layers: list[int]) -> np.ndarray:
    """Quadrature per layer; ``layers[i]`` is the layer of variable ``i``."""
    ssq = np.zeros(max(layers) + 1)
    for array, layer in zip(arrays, layers, strict=True):
        ssq[layer] += np.sum(array**2)
    return np.sqrt(ssq)


def _reference(snapshots: list[list[np.ndarray]], layers: list[int]) -> tuple[Any, Any]:
    """Per-step weight norms and update ratios from consecutive weight snapshots."""
    norms, ratios = [], []
    for before, after in itertools.pairwise(snapshots):
        weight = _layer_norms(after, layers)
        update = _layer_norms([a - b for a, b in zip(after, before, strict=True)], layers)
        norms.append(weight)
        ratios.append(update / weight)
    return np.array(norms), np.array(ratios)


def _fit(
    transport,
    optimizer,
    *,
    policy=None,
    x=None,
    y=None,
    model=None,
    stats_every=1,
    **compile_kwargs,
):
    x, y = _data() if x is None else (x, y)
    model = _model() if model is None else model
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    monitor = GradientMonitor(
        run="weights", transport=transport, policy=policy, flush_every=3, stats_every=stats_every
    )
    weights = _Weights()
    model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False, callbacks=[monitor, weights])
    assert monitor.close(timeout_seconds=10)
    return model, weights.snapshots


# Δw is everything written to the weights during the step: decoupled weight decay and
# the EMA overwrite (every 3rd step here) count too.
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adamw": lambda: keras.optimizers.AdamW(0.05, weight_decay=0.5),
    "adam_ema": lambda: keras.optimizers.Adam(0.05, use_ema=True, ema_overwrite_frequency=3),
}


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_weight_norm_and_update_ratio_match_the_weights_before_and_after(transport, jit, name):
    _, snapshots = _fit(transport, OPTIMIZERS[name](), jit_compile=jit)
    norms, ratios, known = transport.weights()
    assert transport.steps() == list(range(STEPS))
    assert known.all()
    want_norms, want_ratios = _reference(snapshots, [0, 0, 1, 1])
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, want_ratios, rtol=1e-4)


def test_constraint_projection_counts_in_the_update(transport):
    model = _model(constraint=keras.constraints.NonNeg())
    _, snapshots = _fit(transport, keras.optimizers.SGD(0.5), model=model)
    norms, ratios, _ = transport.weights()
    want_norms, want_ratios = _reference(snapshots, [0, 0, 1, 1])
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, want_ratios, rtol=1e-4)


def test_sparse_embedding_update_with_repeated_rows_is_measured(transport):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(10, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(BATCH * STEPS, 4)).astype("int32")  # rows repeat in a batch
    y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")
    _, snapshots = _fit(transport, keras.optimizers.SGD(0.5), model=model, x=x, y=y)
    norms, ratios, _ = transport.weights()
    want_norms, want_ratios = _reference(snapshots, [0, 1, 1])
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, want_ratios, rtol=1e-4)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_weights_are_null_between_stats_steps(transport, jit):
    x, y = _data(BATCH * 10)
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
    monitor = GradientMonitor(run="every", transport=transport, flush_every=2, stats_every=3)
    weights = _Weights()
    model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False, callbacks=[monitor, weights])
    assert monitor.close(timeout_seconds=10)
    norms, ratios, known = transport.weights()
    assert known.tolist() == [step % 3 == 0 for step in range(10)]
    want_norms, want_ratios = _reference(weights.snapshots, [0, 0, 1, 1])
    np.testing.assert_allclose(norms[known], want_norms[known], rtol=1e-5)
    np.testing.assert_allclose(ratios[known], want_ratios[known], rtol=1e-4)
    # On the wire: null rows between stats steps, no field at all in a batch without one.
    by_step = {
        step: (batch.get("weight_norm") or [None] * len(batch["step"]))[i]
        for batch in transport.batches
        for i, step in enumerate(batch["step"])
    }
    assert by_step[1] == [None, None]
    assert None not in by_step[3]
    assert any("weight_norm" not in batch for batch in transport.batches)  # steps 4 and 5


def test_stats_every_zero_sends_no_weight_fields(transport):
    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    monitor = GradientMonitor(run="off", transport=transport, flush_every=3, stats_every=0)
    model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False, callbacks=[monitor])
    assert monitor.close(timeout_seconds=10)
    assert transport.steps() == list(range(STEPS))
    assert not any("weight_norm" in b or "update_ratio" in b for b in transport.batches)
    assert transport.runs[0].config["stats_every"] == 0


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_skipped_step_reports_the_unchanged_weights_and_a_zero_update_ratio(transport, jit):
    x, y = _data()
    nan_step = 3
    x[nan_step * BATCH] = np.nan
    policy = clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0))
    _, snapshots = _fit(transport, keras.optimizers.Adam(0.05), policy=policy, x=x, y=y)
    norms, ratios, known = transport.weights()
    assert transport.column("skipped").tolist() == [i == nan_step for i in range(STEPS)]
    assert known.all()
    assert ratios[nan_step].tolist() == [0.0, 0.0]
    assert (ratios[np.arange(STEPS) != nan_step] > 0).all()
    want_norms, want_ratios = _reference(snapshots, [0, 0, 1, 1])
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, want_ratios, rtol=1e-4)


def _columns(transport) -> tuple[np.ndarray, np.ndarray]:
    norms, ratios, known = transport.weights()
    assert known.all()
    return norms, ratios


@pytest.mark.parametrize(
    ("jit", "steps_per_execution", "stats_every"),
    [(False, 3, 1), (True, 3, 1), (True, 2, 4), (False, 4, 3)],
)
def test_steps_per_execution_measures_the_first_step_of_an_execution_when_due(
    transport, jit, steps_per_execution, stats_every
):
    # Snapshots are taken between executions: the step measured is the first of the
    # execution that starts once stats_every steps have passed since the last one.
    # stats_every=1 measures every step inside the train step, whatever the execution.
    from tests.agent.conftest import RecordingTransport

    plain = RecordingTransport()
    _fit(plain, keras.optimizers.Adam(0.05))
    _fit(
        transport,
        keras.optimizers.Adam(0.05),
        jit_compile=jit,
        steps_per_execution=steps_per_execution,
        stats_every=stats_every,
    )
    assert transport.steps() == list(range(STEPS))
    norms, ratios, known = transport.weights()
    want = {1: list(range(STEPS)), 4: [0, 4], 3: [0, 4]}[stats_every]
    assert np.flatnonzero(known).tolist() == want
    want_norms, want_ratios = _columns(plain)
    np.testing.assert_allclose(norms[known], want_norms[known], rtol=1e-5)
    np.testing.assert_allclose(ratios[known], want_ratios[known], rtol=1e-5)


def test_custom_training_loop_measures_the_weights(transport):
    from tests.agent.conftest import RecordingTransport

    x, y = _data()
    fitted = RecordingTransport()
    _fit(fitted, keras.optimizers.SGD(0.1))
    model = _model()
    monitor = GradientMonitor(run="loop", transport=transport, flush_every=3, stats_every=1)
    monitor.wrap(keras.optimizers.SGD(0.1))

    @tf.function
    def train_step(xb: tf.Tensor, yb: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(yb, model(xb, training=True))
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.apply_gradients(zip(grads, model.trainable_variables, strict=True), loss=loss)

    for i in range(STEPS):
        train_step(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH])
        monitor.on_step()
    assert monitor.close(timeout_seconds=10)
    assert transport.steps() == list(range(STEPS))
    for got, want in zip(_columns(transport), _columns(fitted), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def test_mixed_precision_measures_the_float32_weights(transport, mixed_float16):
    # A modest loss scale: no step overflows float16 here.
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**8)
    _, snapshots = _fit(transport, optimizer)
    norms, ratios = _columns(transport)
    assert not transport.column("skipped").any()
    want_norms, want_ratios = _reference(snapshots, [0, 0, 1, 1])
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, want_ratios, rtol=1e-4)


def test_loss_scale_overflow_step_has_a_zero_update_ratio(transport, mixed_float16):
    # A scale of 2**30 overflows float16 at first: the LSO halves it and skips each time.
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**30
    )
    x, y = _data(BATCH * 20)
    _, snapshots = _fit(transport, optimizer, x=x, y=y)
    norms, ratios = _columns(transport)
    skipped = transport.column("skipped")
    assert skipped[:3].all()
    assert not skipped.all()
    assert (ratios[skipped] == 0.0).all()
    assert (ratios[~skipped] > 0.0).all()
    want_norms, want_ratios = _reference(snapshots, [0, 0, 1, 1])
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, want_ratios, rtol=1e-4)


MIRRORED_POLICIES = {
    "monitor_only": lambda: None,
    "global_norm": lambda: clip.global_norm(1.0),
    "skip_nonfinite": lambda: clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0)),
}


@pytest.mark.parametrize("stats_every", [1, 2])
@pytest.mark.parametrize("name", sorted(MIRRORED_POLICIES))
def test_mirrored_strategy_reports_the_single_device_weight_stats(
    transport, mirrored, name, stats_every
):
    from tests.agent.conftest import RecordingTransport

    x, y = _data()
    if name != "monitor_only":
        x[2 * BATCH + BATCH - 1, 0] = np.nan  # step 2, the second replica's half of the batch
    single = RecordingTransport()
    policy = MIRRORED_POLICIES[name]
    optimizer = keras.optimizers.Adam
    _fit(single, optimizer(0.05), policy=policy(), x=x, y=y, stats_every=stats_every)
    with mirrored.scope():
        model = _model()
        _fit(
            transport,
            optimizer(0.05),
            policy=policy(),
            x=x,
            y=y,
            model=model,
            stats_every=stats_every,
        )
    assert transport.steps() == single.steps() == list(range(STEPS))
    assert transport.column("skipped").tolist() == single.column("skipped").tolist()
    norms, ratios, known = transport.weights()
    assert known.tolist() == [step % stats_every == 0 for step in range(STEPS)]
    for got, want in zip((norms, ratios, known), single.weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)
