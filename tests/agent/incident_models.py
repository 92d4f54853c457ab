"""Models with planted faults for the incident tests, importable by ``gradwatch replay
--model-fn tests.agent.incident_models:FUNCTION``.

``planted_log``: a layer takes ``log`` of its input, and the test data has a 0 in one batch,
so that step's forward pass makes -inf there and its gradient NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf


class LogLayer(keras.layers.Layer):  # type: ignore[misc]
    """log(x), element-wise: -inf at 0, NaN below (the planted fault)."""

    def call(self, x: Any) -> Any:
        return tf.math.log(x)


def _compiled(layers: Callable[[], list[keras.layers.Layer]]) -> keras.Model:
    """``Sequential(Input((4,)), *layers())`` compiled with Adam(0.01) and MSE, seed 1 (set
    before the layers are made: their initializers draw their seeds then)."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), *layers()])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def planted_log() -> keras.Model:
    """A small regression model whose first layer is :class:`LogLayer` (compiled)."""
    return _compiled(
        lambda: [
            LogLayer(name="log"),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )


def planted_log_accumulating() -> keras.Model:
    """:func:`planted_log` with ``Adam(0.01, gradient_accumulation_steps=2)``."""
    model = planted_log()
    optimizer = keras.optimizers.Adam(0.01, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def plain() -> keras.Model:
    """A model with no planted fault (for the NaN-in-the-data batch)."""
    return _compiled(
        lambda: [
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )


def linear() -> keras.Model:
    """Two linear layers: a learning-rate jump makes the next gradient explode, finitely."""
    return _compiled(
        lambda: [keras.layers.Dense(8, name="hidden"), keras.layers.Dense(1, name="out")]
    )


def wide() -> keras.Model:
    """Not the model of any bundle: 16 hidden units (for the mismatch test)."""
    return _compiled(lambda: [keras.layers.Dense(16, name="hidden"), keras.layers.Dense(1)])


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
            lambda: [
                Amplify(name="amplify"),
                keras.layers.Dense(8, name="hidden"),
                keras.layers.Dense(1, name="out", dtype="float32"),
            ]
        )
    finally:
        keras.config.set_dtype_policy("float32")


def mixed_linear() -> keras.Model:
    """:func:`linear` under ``mixed_float16`` with a ``LossScaleOptimizer`` whose scale (16)
    no step of the tests' data overflows: its finite steps are recorded and captured like
    any other. Restores the float32 policy."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, name="hidden"),
                keras.layers.Dense(1, name="out", dtype="float32"),
            ]
        )
    finally:
        keras.config.set_dtype_policy("float32")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01), initial_scale=16)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def dropout() -> keras.Model:
    """Linear layers around a ``Dropout(0.5)``: its mask changes every step, so a replay that
    draws its own mask gets another gradient (the learning-rate-jump test's model with one)."""
    return _compiled(
        lambda: [
            keras.layers.Dense(16, name="wide"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(1, name="out"),
        ]
    )


LATENT = 4


class BackwardFault(keras.layers.Layer):  # type: ignore[misc]
    """Identity forward; its gradient is NaN while the non-trainable ``armed`` is 1 (a
    callback sets it), so only what backpropagates through it (the generator's own
    update) breaks, not the discriminator's."""

    def build(self, input_shape: Any) -> None:
        self.armed = self.add_weight(shape=(), initializer="zeros", trainable=False, name="armed")

    def call(self, x: Any) -> Any:
        broken = tf.convert_to_tensor(self.armed) > 0

        @tf.custom_gradient  # type: ignore[misc]
        def fault(inputs: Any) -> Any:
            def grad(upstream: Any) -> Any:
                return upstream * tf.where(broken, float("nan"), 1.0)

            return tf.identity(inputs), grad

        return fault(x)


class GAN(keras.Model):  # type: ignore[misc]
    """keras-io's ``dcgan_overriding_train_step.py`` (latent vectors drawn in the step from
    the model's ``SeedGenerator``, noisy labels), on 8×8 images."""

    def __init__(self, discriminator: keras.Model, generator: keras.Model) -> None:
        super().__init__(name="gan")
        self.discriminator = discriminator
        self.generator = generator
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, images: Any) -> Any:
        return self.discriminator(images)

    def compile(self, d_optimizer: Any, g_optimizer: Any, loss_fn: Any) -> None:
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def train_step(self, real_images: Any) -> Any:
        batch_size = tf.shape(real_images)[0]
        latent = keras.random.normal((batch_size, LATENT), seed=self.seed_generator)
        images = tf.concat([self.generator(latent), real_images], axis=0)
        labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(tf.shape(labels), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(images))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights, strict=True)
        )
        latent = keras.random.normal((batch_size, LATENT), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            predictions = self.discriminator(self.generator(latent))
            g_loss = self.loss_fn(tf.zeros((batch_size, 1)), predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights, strict=True))
        return {"d_loss": d_loss, "g_loss": g_loss}


def planted_gan(wrap: Any = None) -> GAN:
    """A small DCGAN whose generator has a :class:`BackwardFault` between its two layers
    (compiled; ``wrap(optimizer, group)`` wraps each optimizer, e.g. ``monitor.wrap``)."""
    keras.utils.set_random_seed(1)
    discriminator = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv"),
            keras.layers.LeakyReLU(0.2),
            keras.layers.Flatten(),
            keras.layers.Dense(1, name="logit"),
        ],
        name="discriminator",
    )
    generator = keras.Sequential(
        [
            keras.Input((LATENT,)),
            keras.layers.Dense(4 * 4 * 4, name="project"),
            BackwardFault(name="fault"),
            keras.layers.LeakyReLU(0.2),
            keras.layers.Reshape((4, 4, 4)),
            keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same", name="deconv"),
        ],
        name="generator",
    )
    gan = GAN(discriminator, generator)
    wrap = wrap or (lambda optimizer, group: optimizer)
    gan.compile(
        d_optimizer=wrap(keras.optimizers.Adam(1e-3), "discriminator"),
        g_optimizer=wrap(keras.optimizers.Adam(1e-3), "generator"),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return gan


def named_inputs() -> keras.Model:
    """A functional model fed a dict of two named inputs, ``a`` through :class:`LogLayer`
    (compiled like the others): a bundle must hand the replay its dict back."""
    keras.utils.set_random_seed(1)
    a = keras.Input((4,), name="a")
    b = keras.Input((2,), name="b")
    joined = keras.layers.Concatenate(name="join")([LogLayer(name="log")(a), b])
    hidden = keras.layers.Dense(8, name="hidden")(joined)
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1, name="out")(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model
