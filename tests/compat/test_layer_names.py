"""Layer names are paths in the model's layer tree: unique, nested, the same in every build."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from tests.compat.conftest import layer_norms


def _encoder(name: str) -> keras.Model:
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(4, name="proj")(inputs), name=name)


def _twin_towers() -> keras.Model:
    """Two functional sub-models that both hold a Dense named "proj", then an auto-named head."""
    inputs = keras.Input((6,))
    merged = keras.layers.Concatenate()([_encoder("tower_a")(inputs), _encoder("tower_b")(inputs)])
    return keras.Model(inputs, keras.layers.Dense(1)(merged), name="twin")


class _Scaled(keras.Model):
    """Subclassed: a weight of its own, an explicit layer, and a nested functional model."""

    def __init__(self) -> None:
        super().__init__(name="scaled")
        self.inner = _encoder("inner")
        self.proj = keras.layers.Dense(1, name="proj")
        self.scale = self.add_weight(shape=(1,), initializer="ones", name="scale")

    def call(self, x):
        return self.proj(self.inner(x)) * self.scale


def _fit(model: keras.Model, transport, steps: int = 3) -> GradientMonitor:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, 6)).astype(np.float32)
    y = rng.normal(size=(8 * steps, 1)).astype(np.float32)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = GradientMonitor("names", transport=transport)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.close()
    return monitor


def test_clashing_inner_names_in_two_sub_models_are_two_layers(transport):
    monitor = _fit(_twin_towers(), transport)
    assert monitor.layers == ("twin/tower_a/proj", "twin/tower_b/proj", "twin/dense")
    assert transport.steps() == [0, 1, 2]


def test_the_same_architecture_built_twice_gets_the_same_names(transport):
    first = _fit(_twin_towers(), transport).layers
    again = _fit(_twin_towers(), transport).layers  # Keras now names the head dense_1
    assert first == again


def test_sequential_and_functional_models_both_carry_their_model_name(transport):
    sequential = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3), keras.layers.Dense(1)], name="seq"
    )
    assert _fit(sequential, transport).layers == ("seq/dense", "seq/dense_1")
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    functional = keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden), name="fn")
    assert _fit(functional, transport).layers == ("fn/hidden", "fn/out")


def test_subclassed_model_reports_its_own_weight_and_nested_layers(transport):
    monitor = _fit(_Scaled(), transport)
    assert set(monitor.layers) == {"scaled", "scaled/proj", "scaled/inner/proj"}


def test_nested_layer_norms_equal_a_gradient_tape_of_the_same_batch(transport):
    keras.utils.set_random_seed(3)
    model = _twin_towers()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model(x)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    owners = {}
    for layer, name in (
        (model.get_layer("tower_a").get_layer("proj"), "twin/tower_a/proj"),
        (model.get_layer("tower_b").get_layer("proj"), "twin/tower_b/proj"),
        (model.layers[-1], "twin/dense"),
    ):
        owners.update({id(v): name for v in layer.trainable_variables})
    want = layer_norms(grads, model.trainable_variables, owners)

    monitor = GradientMonitor("tape", transport=transport)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.close()
    got = dict(zip(monitor.layers, transport.column("grad_norm")[0], strict=True))
    assert set(got) == set(want)
    for name, norm in want.items():
        np.testing.assert_allclose(got[name], norm, rtol=1e-5)
    np.testing.assert_allclose(transport.column("loss")[0], float(loss), rtol=1e-5)
