"""A custom ``train_step`` (keras-io's VAE pattern): steps, layer paths, norms and its loss."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from tests.compat.conftest import layer_norms

LATENT = 2


class _Sampling(keras.layers.Layer):
    def call(self, inputs):
        mean, log_var = inputs
        return mean + tf.exp(0.5 * log_var) * 0.5  # deterministic "noise": comparable runs


def _vae() -> tuple[keras.Model, keras.Model]:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    mean = keras.layers.Dense(LATENT, name="z_mean")(x)
    log_var = keras.layers.Dense(LATENT, name="z_log_var")(x)
    encoder = keras.Model(inputs, [mean, log_var, _Sampling()([mean, log_var])], name="encoder")
    latent = keras.Input((LATENT,))
    y = keras.layers.Dense(4 * 4 * 4, activation="relu", name="fc")(latent)
    y = keras.layers.Reshape((4, 4, 4))(y)
    y = keras.layers.Conv2DTranspose(
        1, 3, strides=2, padding="same", activation="sigmoid", name="deconv"
    )(y)
    return encoder, keras.Model(latent, y, name="decoder")


class VAE(keras.Model):
    """keras-io ``generative/vae.py``: a custom train_step and Mean loss trackers."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(name="vae", **kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.kl_loss_tracker]

    def losses_of(self, data):
        mean, log_var, z = self.encoder(data)
        reconstruction = self.decoder(z)
        reconstruction_loss = tf.reduce_mean(
            tf.reduce_sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2))
        )
        kl = -0.5 * (1 + log_var - tf.square(mean) - tf.exp(log_var))
        kl_loss = tf.reduce_mean(tf.reduce_sum(kl, axis=1))
        return reconstruction_loss + kl_loss, kl_loss

    def train_step(self, data):
        with tf.GradientTape() as tape:
            total_loss, kl_loss = self.losses_of(data)
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
        self.total_loss_tracker.update_state(total_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {"loss": self.total_loss_tracker.result(), "kl_loss": self.kl_loss_tracker.result()}


class _KLDivergence(keras.layers.Layer):
    """Adds the KL term with ``add_loss`` (the older keras-io VAE form)."""

    def call(self, inputs):
        mean, log_var = inputs
        kl = -0.5 * (1 + log_var - tf.square(mean) - tf.exp(log_var))
        self.add_loss(tf.reduce_mean(tf.reduce_sum(kl, axis=1)))
        return mean


class AddLossVAE(VAE):
    """The same VAE whose KL term comes from ``add_loss`` and ``self.losses``."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(encoder, decoder, **kwargs)
        self.kl = _KLDivergence(name="kl")

    def losses_of(self, data):
        mean, log_var, z = self.encoder(data)
        self.kl([mean, log_var])
        reconstruction = self.decoder(z)
        reconstruction_loss = tf.reduce_mean(
            tf.reduce_sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2))
        )
        kl_loss = tf.add_n(self.losses)
        return reconstruction_loss + kl_loss, kl_loss


@pytest.mark.parametrize("model_class", [VAE, AddLossVAE], ids=["trackers", "add_loss"])
def test_vae_custom_train_step_records_steps_paths_norms_and_the_step_loss(transport, model_class):
    keras.utils.set_random_seed(5)
    data = np.random.default_rng(0).uniform(size=(24, 8, 8, 1)).astype(np.float32)
    vae = model_class(*_vae())
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    first = data[:8]
    with tf.GradientTape() as tape:
        loss, _ = vae.losses_of(first)
    grads = tape.gradient(loss, vae.trainable_weights)

    monitor = GradientMonitor("vae", transport=transport)
    vae.fit(data, epochs=1, batch_size=8, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.close()

    assert transport.steps() == [0, 1, 2]
    assert monitor.layers[:2] == ("vae/encoder/conv", "vae/encoder/z_mean")
    assert {n.split("/")[1] for n in monitor.layers} == {"encoder", "decoder"}
    # The step's own loss (not the tracker's running mean), at every step.
    losses = transport.column("loss")
    assert transport.column("loss_known").all()
    np.testing.assert_allclose(losses[0], float(loss), rtol=1e-5)
    owners = {}
    for model in (vae.encoder, vae.decoder):
        for layer in model.layers:
            owners.update(
                {id(v): f"vae/{model.name}/{layer.name}" for v in layer.trainable_weights}
            )
    want = layer_norms(grads, vae.trainable_weights, owners)
    got = dict(zip(monitor.layers, transport.column("grad_norm")[0], strict=True))
    assert set(got) == set(want)
    for name, norm in want.items():
        np.testing.assert_allclose(got[name], norm, rtol=1e-5)
