"""``gradient_accumulation_steps``: one recorded step per real update, of the averaged gradient.

Reference: with a mean loss, the average of the gradients of two micro-batches
of 16 is the gradient of their batch of 32 at the same weights, so a run with
``gradient_accumulation_steps=2`` and batch 16 must record and clip exactly as
a run without accumulation on batch 32 (and match Keras' own clipping of the
accumulated average).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradwatch.agent import ConfigError, GradientMonitor, clip

MICRO, STEPS = 16, 6


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * MICRO * STEPS, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.3 * rng.normal(size=(len(x), 1))).astype("float32")
    return x, y


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )


def _fit(transport, optimizer, batch_size, policy=None, x=None, y=None, **compile_kwargs):
    x, y = _data() if x is None else (x, y)
    model = _model()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    callbacks = []
    if transport is not None:
        callbacks.append(
            GradientMonitor(
                run="accumulate", transport=transport, policy=policy, flush_every=2, stats_every=1
            )
        )
    model.fit(x, y, batch_size=batch_size, verbose=0, shuffle=False, callbacks=callbacks)
    for callback in callbacks:
        assert callback.close(timeout_seconds=10)
    return model


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_accumulated_steps_are_measured_and_clipped_like_one_big_batch(transport, jit):
    from tests.agent.conftest import RecordingTransport

    big = RecordingTransport()
    want = _fit(big, keras.optimizers.SGD(0.1), 2 * MICRO, clip.global_norm(0.5))
    accumulating = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    got = _fit(transport, accumulating, MICRO, clip.global_norm(0.5), jit_compile=jit)
    keras_clipped = _fit(
        None,
        keras.optimizers.SGD(0.1, gradient_accumulation_steps=2, global_clipnorm=0.5),
        MICRO,
    )
    assert transport.steps() == big.steps() == list(range(STEPS))
    assert (transport.column("clip_coef") < 1.0).any()  # the limit binds
    for column in ("global_norm", "global_norm_clipped", "clip_coef", "grad_norm", "loss"):
        np.testing.assert_allclose(
            transport.column(column), big.column(column), rtol=1e-5, err_msg=column
        )
    for got_stat, want_stat in zip(transport.weights(), big.weights(), strict=True):
        np.testing.assert_allclose(got_stat, want_stat, rtol=1e-5)
    for g, w, k in zip(
        got.get_weights(), want.get_weights(), keras_clipped.get_weights(), strict=True
    ):
        np.testing.assert_allclose(g, w, atol=1e-6)
        np.testing.assert_allclose(g, k, atol=1e-6)
    assert int(accumulating.iterations.numpy()) == STEPS


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_a_skip_policy_skips_the_whole_accumulated_update(transport, jit):
    from tests.agent.conftest import RecordingTransport

    x, y = _data()
    bad = 2
    x[bad * 2 * MICRO + MICRO + 3] = np.nan  # the second micro-batch of update 2
    policy = clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0))
    big = RecordingTransport()
    want = _fit(big, keras.optimizers.SGD(0.1), 2 * MICRO, policy, x, y)
    accumulating = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    got = _fit(transport, accumulating, MICRO, policy, x, y, jit_compile=jit)
    skipped = transport.column("skipped").tolist()
    assert skipped == big.column("skipped").tolist() == [i == bad for i in range(STEPS)]
    assert transport.weights()[1][bad].tolist() == [0.0, 0.0]
    for g, w in zip(got.get_weights(), want.get_weights(), strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=1e-6)


def test_adamw_weight_decay_is_applied_once_per_update_and_measured(transport):
    from tests.agent.conftest import RecordingTransport

    big = RecordingTransport()
    want = _fit(big, keras.optimizers.AdamW(0.05, weight_decay=0.5), 2 * MICRO)
    optimizer = keras.optimizers.AdamW(0.05, weight_decay=0.5, gradient_accumulation_steps=2)
    got = _fit(transport, optimizer, MICRO)
    for g, w in zip(got.get_weights(), want.get_weights(), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)
    for g, w in zip(transport.weights(), big.weights(), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5)


def test_accumulation_under_mirrored_strategy_raises_a_clear_error(transport, mirrored):
    with mirrored.scope():
        model = _model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), loss="mse"
        )
    monitor = GradientMonitor(run="accumulate", transport=transport)
    x, y = _data()
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        model.fit(x, y, batch_size=MICRO, verbose=0, callbacks=[monitor])
    monitor.close(timeout_seconds=10)


def test_mixed_precision_accumulation_records_the_unscaled_averaged_gradient(transport):
    from tests.agent.conftest import RecordingTransport

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        # A modest loss scale: no micro-batch overflows float16 here.
        accumulating = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), initial_scale=2.0**8
        )
        _fit(transport, accumulating, MICRO, clip.global_norm(0.5))
        big = RecordingTransport()
        plain = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**8)
        _fit(big, plain, 2 * MICRO, clip.global_norm(0.5))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert transport.steps() == big.steps() == list(range(STEPS))
    assert not transport.column("skipped").any()
    for column in ("global_norm", "loss"):
        np.testing.assert_allclose(
            transport.column(column), big.column(column), rtol=2e-3, err_msg=column
        )
