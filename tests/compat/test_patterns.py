"""keras-io patterns as small real fits: steps recorded, layer names, norms equal to a tape.

The reference is a ``tf.GradientTape`` of the same loss on the same first batch, at the
same initial weights: per-layer norms (as a sorted list, since the layer → variable map is
what the names test) and the global norm, rtol 1e-5.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor

BATCH = 8


def _convnet() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """keras-io ``vision/mnist_convnet.py``, smaller."""
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv_1"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv_2"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.0),
            keras.layers.Dense(3, activation="softmax", name="classifier"),
        ],
        name="convnet",
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCH, 12, 12, 1)).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 3, 4 * BATCH), 3)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy")
    return model, x, y


class _TransformerBlock(keras.layers.Layer):
    """keras-io ``nlp/text_classification_with_transformer.py``'s block."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="att")
        self.ffn = keras.Sequential(
            [keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)], name="ffn"
        )
        self.norm_1 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_1")
        self.norm_2 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_2")

    def call(self, inputs):
        out = self.norm_1(inputs + self.att(inputs, inputs))
        return self.norm_2(out + self.ffn(out))


def _transformer() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    inputs = keras.Input((10,), dtype="int32")
    x = keras.layers.Embedding(50, 8, name="tokens")(inputs)
    x = _TransformerBlock(name="block")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name="classifier_model")
    rng = np.random.default_rng(1)
    x_data = rng.integers(0, 50, size=(4 * BATCH, 10)).astype(np.int32)
    y_data = rng.integers(0, 2, size=(4 * BATCH,)).astype(np.int32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model, x_data, y_data


def _owners(model) -> dict[str, keras.layers.Layer]:
    """Each expected layer name → its Keras layer, spelled out by hand for the two models."""
    prefix = model.name
    if prefix == "convnet":
        return {f"convnet/{n}": model.get_layer(n) for n in ("conv_1", "conv_2", "classifier")}
    block = model.get_layer("block")
    att = block.att
    return {
        f"{prefix}/tokens": model.get_layer("tokens"),
        f"{prefix}/block/att/query": att.query_dense,
        f"{prefix}/block/att/key": att.key_dense,
        f"{prefix}/block/att/value": att.value_dense,
        f"{prefix}/block/att/attention_output": att.output_dense,
        f"{prefix}/block/ffn/dense": block.ffn.layers[0],
        f"{prefix}/block/ffn/dense_1": block.ffn.layers[1],
        f"{prefix}/block/norm_1": block.norm_1,
        f"{prefix}/block/norm_2": block.norm_2,
        f"{prefix}/classifier": model.get_layer("classifier"),
    }


def _tape(model, x, y) -> dict[str, float]:
    """Per-layer gradient norms of the first batch (float64), by expected layer name."""
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    by_variable = {
        id(v): np.asarray(tf.convert_to_tensor(g), np.float64)
        for v, g in zip(model.trainable_variables, grads, strict=True)
    }
    return {
        name: float(
            np.sqrt(sum(np.sum(np.square(by_variable[id(v)])) for v in layer.trainable_weights))
        )
        for name, layer in _owners(model).items()
    }


def _check_first_step(transport, monitor, want: dict[str, float]) -> None:
    got = dict(zip(monitor.layers, transport.column("grad_norm")[0], strict=True))
    assert set(got) == set(want)
    for name, norm in want.items():
        np.testing.assert_allclose(got[name], norm, rtol=1e-5, err_msg=name)
    total = np.sqrt(sum(v * v for v in want.values()))
    np.testing.assert_allclose(transport.column("global_norm")[0], total, rtol=1e-5)


@pytest.mark.parametrize("build", [_convnet, _transformer], ids=["convnet", "transformer"])
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_fit_records_every_step_with_tape_norms(transport, build, steps_per_execution):
    keras.utils.set_random_seed(2)
    model, x, y = build()
    model.compile(
        optimizer=model.optimizer, loss=model.loss, steps_per_execution=steps_per_execution
    )
    want = _tape(model, x[:BATCH], y[:BATCH])
    monitor = GradientMonitor("pattern", transport=transport)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.close()
    assert transport.steps() == [0, 1, 2, 3]
    _check_first_step(transport, monitor, want)
    assert transport.column("loss_known").all()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_custom_loop_in_tf_function_records_every_step_with_tape_norms(transport, jit_compile):
    keras.utils.set_random_seed(3)
    model, x, y = _convnet()
    want = _tape(model, x[:BATCH], y[:BATCH])
    loss_fn = keras.losses.CategoricalCrossentropy()
    monitor = GradientMonitor("loop", transport=transport)
    monitor.set_model(model)
    optimizer = monitor.wrap(keras.optimizers.SGD(0.01))

    @tf.function(jit_compile=jit_compile)
    def train_step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(y_batch, model(x_batch, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.apply_gradients(zip(grads, model.trainable_variables, strict=True), loss=loss)
        return loss

    losses = []
    for i in range(4):
        batch = slice(i * BATCH, (i + 1) * BATCH)
        losses.append(float(train_step(x[batch], y[batch])))
        monitor.on_step()
    assert monitor.close()
    assert optimizer.iterations.numpy() == 4
    assert transport.steps() == [0, 1, 2, 3]
    assert monitor.layers == ("convnet/conv_1", "convnet/conv_2", "convnet/classifier")
    np.testing.assert_allclose(transport.column("loss"), losses, rtol=1e-6)
    _check_first_step(transport, monitor, want)
