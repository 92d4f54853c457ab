"""Models with planted faults for the incident tests, importable by ``gradwatch replay
--model-fn tests.agent.incident_models:FUNCTION``.

``planted_log``: a layer takes ``log`` of its input, and the test data has a 0 in one batch,
so that step's forward pass makes -inf there and its gradient NaN.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


class LogLayer(keras.layers.Layer):  # type: ignore[misc]
    """log(x), element-wise: -inf at 0, NaN below (the planted fault)."""

    def call(self, x: Any) -> Any:
        return tf.math.log(x)


def _compiled(*layers: keras.layers.Layer) -> keras.Model:
    """``Sequential(Input((4,)), *layers)`` compiled with Adam(0.01) and MSE, seed 1."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), *layers])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def planted_log() -> keras.Model:
    """A small regression model whose first layer is :class:`LogLayer` (compiled)."""
    return _compiled(
        LogLayer(name="log"),
        keras.layers.Dense(8, activation="tanh", name="hidden"),
        keras.layers.Dense(1, name="out"),
    )


def plain() -> keras.Model:
    """A model with no planted fault (for the NaN-in-the-data batch)."""
    return _compiled(
        keras.layers.Dense(8, activation="tanh", name="hidden"), keras.layers.Dense(1, name="out")
    )


def linear() -> keras.Model:
    """Two linear layers: a learning-rate jump makes the next gradient explode, finitely."""
    return _compiled(keras.layers.Dense(8, name="hidden"), keras.layers.Dense(1, name="out"))


def wide() -> keras.Model:
    """Not the model of any bundle: 16 hidden units (for the mismatch test)."""
    return _compiled(keras.layers.Dense(16, name="hidden"), keras.layers.Dense(1))


class Amplify(keras.layers.Layer):  # type: ignore[misc]
    """x × 1000 in the layer's compute dtype: past float16's 65,504 for inputs above ~65."""

    def call(self, x: Any) -> Any:
        return x * tf.cast(1000.0, x.dtype)


def planted_overflow() -> keras.Model:
    """Under ``mixed_float16``: an :class:`Amplify` layer whose float16 output overflows to
    Inf on a batch holding a large input; linear layers carry it to the loss, so that step's
    loss is non-finite (compiled with a ``LossScaleOptimizer``, as Keras does for the
    policy). Restores the float32 policy."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        return _compiled(
            Amplify(name="amplify"),
            keras.layers.Dense(8, name="hidden"),
            keras.layers.Dense(1, name="out", dtype="float32"),
        )
    finally:
        keras.config.set_dtype_policy("float32")


def dropout() -> keras.Model:
    """Linear layers around a ``Dropout(0.5)``: its mask changes every step, so a replay that
    draws its own mask gets another gradient (the learning-rate-jump test's model with one)."""
    return _compiled(
        keras.layers.Dense(16, name="wide"),
        keras.layers.Dropout(0.5, name="drop"),
        keras.layers.Dense(1, name="out"),
    )
