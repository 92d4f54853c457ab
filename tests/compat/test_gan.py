"""keras-io's DCGAN pattern: ``super().compile()``, two optimizers stepped in ``train_step``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import ConfigError, GradientMonitor, clip
from tests.compat.conftest import layer_norms

LATENT = 4


def _networks() -> tuple[keras.Model, keras.Model]:
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
            keras.layers.LeakyReLU(0.2),
            keras.layers.Reshape((4, 4, 4)),
            keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same", name="deconv"),
        ],
        name="generator",
    )
    return discriminator, generator


class GAN(keras.Model):
    """keras-io ``generative/dcgan_overriding_train_step.py``, with the latent vectors
    given in the data (instead of drawn in the step) so a tape can replay the same batch."""

    def __init__(self, discriminator, generator):
        super().__init__(name="gan")
        self.discriminator = discriminator
        self.generator = generator

    def call(self, images):  # only for Keras' symbolic build under a distribution strategy
        return self.discriminator(images)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def d_loss(self, real, latent):
        fake = self.generator(latent)
        images = tf.concat([fake, real], axis=0)
        n = tf.shape(real)[0]
        labels = tf.concat([tf.ones((n, 1)), tf.zeros((n, 1))], axis=0)
        return self.loss_fn(labels, self.discriminator(images))

    def g_loss(self, latent):
        misleading = tf.zeros((tf.shape(latent)[0], 1))
        return self.loss_fn(misleading, self.discriminator(self.generator(latent)))

    def train_step(self, data):
        real, latent = data
        with tf.GradientTape() as tape:
            d_loss = self.d_loss(real, latent)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights, strict=True)
        )
        with tf.GradientTape() as tape:
            g_loss = self.g_loss(latent)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights, strict=True))
        return {"d_loss": d_loss, "g_loss": g_loss}


def _data(batches: int = 3, batch: int = 8):
    rng = np.random.default_rng(0)
    real = rng.uniform(size=(batches * batch, 8, 8, 1)).astype(np.float32)
    latent = rng.normal(size=(batches * batch, LATENT)).astype(np.float32)
    return real, latent


def _reference_first_step(weights, real, latent) -> dict[str, float]:
    """The first train_step replayed eagerly with tapes, on a twin GAN with the same weights."""
    gan = GAN(*_networks())
    gan.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3), _loss())
    gan.discriminator.set_weights(weights[0])
    gan.generator.set_weights(weights[1])
    with tf.GradientTape() as tape:
        d_loss = gan.d_loss(real, latent)
    d_grads = tape.gradient(d_loss, gan.discriminator.trainable_weights)
    gan.d_optimizer.apply_gradients(zip(d_grads, gan.discriminator.trainable_weights, strict=True))
    with tf.GradientTape() as tape:
        g_loss = gan.g_loss(latent)
    g_grads = tape.gradient(g_loss, gan.generator.trainable_weights)
    norms = {}
    for group, model, grads in (
        ("discriminator", gan.discriminator, d_grads),
        ("generator", gan.generator, g_grads),
    ):
        owners = {
            id(v): f"{group}/{layer.name}"
            for layer in model.layers
            for v in layer.trainable_weights
        }
        norms.update(layer_norms(grads, model.trainable_weights, owners))
    return norms


def _loss() -> keras.losses.Loss:
    return keras.losses.BinaryCrossentropy(from_logits=True)


def test_gan_with_two_wrapped_optimizers_records_one_run_with_both_groups(transport):
    keras.utils.set_random_seed(11)
    gan = GAN(*_networks())
    real, latent = _data()
    monitor = GradientMonitor("dcgan", transport=transport, stats_every=1)
    gan.compile(
        d_optimizer=monitor.wrap(keras.optimizers.Adam(1e-3), group="discriminator"),
        g_optimizer=monitor.wrap(
            keras.optimizers.Adam(1e-3), group="generator", policy=clip.global_norm(1e9)
        ),
        loss_fn=_loss(),
    )
    gan.discriminator(real[:1])
    gan.generator(latent[:1])
    weights = (gan.discriminator.get_weights(), gan.generator.get_weights())
    dataset = tf.data.Dataset.from_tensor_slices((real, latent)).batch(8)
    gan.fit(dataset, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.close()

    assert monitor.groups == ("discriminator", "generator")
    assert monitor.layers == (
        "discriminator/conv",
        "discriminator/logit",
        "generator/project",
        "generator/deconv",
    )
    assert transport.steps() == [0, 1, 2]  # one step per train_step, not per optimizer
    grad_norm = transport.column("grad_norm")
    want = _reference_first_step(weights, real[:8], latent[:8])
    for name, value in zip(monitor.layers, grad_norm[0], strict=True):
        np.testing.assert_allclose(value, want[name], rtol=1e-5)
    np.testing.assert_allclose(
        transport.column("global_norm")[0], np.sqrt(sum(v * v for v in want.values())), rtol=1e-5
    )
    _, ratio, known = transport.weights()
    assert known.all()
    assert (ratio > 0).all()  # both groups moved their weights every step
    config = transport.runs[0].config
    assert config["flush_every"] == 50
    assert config["groups"] == {
        "discriminator": None,
        "generator": {"policy": "global_norm", "max_norm": 1e9},
    }


def test_a_second_optimizer_without_a_group_says_how_to_watch_both(transport):
    monitor = GradientMonitor("two", transport=transport)
    monitor.wrap(keras.optimizers.Adam())
    with pytest.raises(ConfigError, match=r"give each a group: monitor.wrap\(optimizer, group="):
        monitor.wrap(keras.optimizers.Adam())
    with pytest.raises(ConfigError, match="without a group; give every optimizer"):
        monitor.wrap(keras.optimizers.Adam(), group="generator")
    assert monitor.close()


def test_gan_custom_loop_with_groups_counts_one_step_per_on_step(transport):
    keras.utils.set_random_seed(12)
    discriminator, generator = _networks()
    gan = GAN(discriminator, generator)
    real, latent = _data(batches=4)
    monitor = GradientMonitor("gan-loop", transport=transport, flush_every=2)
    monitor.set_model(gan)
    d_opt = monitor.wrap(keras.optimizers.Adam(1e-3), group="discriminator")
    g_opt = monitor.wrap(keras.optimizers.Adam(1e-3), group="generator")
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt, loss_fn=_loss())

    @tf.function(jit_compile=True)
    def step(real, latent):
        with tf.GradientTape() as tape:
            d_loss = gan.d_loss(real, latent)
        monitor.record_loss(d_loss)
        grads = tape.gradient(d_loss, discriminator.trainable_weights)
        d_opt.apply_gradients(zip(grads, discriminator.trainable_weights, strict=True))
        for _ in range(2):  # the generator steps twice per step: its max norm is kept
            with tf.GradientTape() as tape:
                g_loss = gan.g_loss(latent)
            grads = tape.gradient(g_loss, generator.trainable_weights)
            g_opt.apply_gradients(zip(grads, generator.trainable_weights, strict=True))
        return d_loss

    losses = []
    for i in range(4):
        losses.append(float(step(real[i * 8 : (i + 1) * 8], latent[i * 8 : (i + 1) * 8])))
        monitor.on_step()
    assert monitor.close()
    assert transport.steps() == [0, 1, 2, 3]
    assert monitor.layers[0] == "discriminator/conv"
    assert monitor.layers[-1] == "generator/deconv"
    np.testing.assert_allclose(transport.column("loss"), losses, rtol=1e-6)
    assert len(transport.batches) == 2  # flush_every=2


def test_gan_under_mirrored_strategy_equals_one_device(transport, mirrored):
    # Keras itself needs a custom train_step's optimizers built before a distributed fit
    # (it cannot create their variables inside the replicated step): the same is true here.
    keras.utils.set_random_seed(11)
    real, latent = _data()
    with mirrored.scope():
        gan = GAN(*_networks())
        monitor = GradientMonitor("dcgan-mirrored", transport=transport)
        gan.compile(
            d_optimizer=monitor.wrap(keras.optimizers.Adam(1e-3), group="discriminator"),
            g_optimizer=monitor.wrap(keras.optimizers.Adam(1e-3), group="generator"),
            loss_fn=_loss(),
        )
        gan.discriminator(real[:1])
        gan.generator(latent[:1])
        gan.d_optimizer.build(gan.discriminator.trainable_variables)
        gan.g_optimizer.build(gan.generator.trainable_variables)
    weights = (gan.discriminator.get_weights(), gan.generator.get_weights())
    dataset = tf.data.Dataset.from_tensor_slices((real, latent)).batch(8)
    gan.fit(dataset, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.close()
    assert transport.steps() == [0, 1, 2]
    want = _reference_first_step(weights, real[:8], latent[:8])
    for name, value in zip(monitor.layers, transport.column("grad_norm")[0], strict=True):
        np.testing.assert_allclose(value, want[name], rtol=1e-5)


def test_two_monitors_as_callbacks_each_record_their_optimizer():
    from tests.fakes import RecordingTransport

    keras.utils.set_random_seed(13)
    gan = GAN(*_networks())
    real, latent = _data()
    d_transport, g_transport = RecordingTransport(), RecordingTransport()
    d_monitor = GradientMonitor("d", transport=d_transport)
    g_monitor = GradientMonitor("g", transport=g_transport)
    gan.compile(
        d_optimizer=d_monitor.wrap(keras.optimizers.Adam(1e-3)),
        g_optimizer=g_monitor.wrap(keras.optimizers.Adam(1e-3)),
        loss_fn=_loss(),
    )
    dataset = tf.data.Dataset.from_tensor_slices((real, latent)).batch(8)
    gan.fit(dataset, epochs=1, verbose=0, callbacks=[d_monitor, g_monitor])
    assert d_monitor.close()
    assert g_monitor.close()
    assert d_transport.steps() == g_transport.steps() == [0, 1, 2]
    assert d_monitor.layers == ("gan/discriminator/conv", "gan/discriminator/logit")
    assert g_monitor.layers == ("gan/generator/project", "gan/generator/deconv")
