"""Keras still *calls* every hook gradwatch relies on (gradwatch.agent._keras_compat).

Each test shadows one hook on an instance with a counter and drives Keras through its
public API: a Keras release that stops calling a hook fails here, by name, instead of
making gradwatch record something silently wrong.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import _keras_compat as compat


def _counting(obj, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    vars(obj)[name] = counted
    return calls


def test_the_installed_keras_is_in_the_measured_range_with_every_private_hook():
    assert compat.check_keras() == []


def test_check_keras_names_a_version_outside_the_range():
    with pytest.warns(RuntimeWarning, match=r"Keras 4\.1 is outside the versions"):
        compat.check_keras("4.1")


@pytest.mark.parametrize("hook", ["_clip_gradients", "_apply_weight_decay", "_backend_update_step"])
def test_gradient_accumulation_calls_the_hooks_on_the_real_update(hook):
    variable = keras.Variable(np.ones(3, np.float32))
    optimizer = keras.optimizers.AdamW(0.1, gradient_accumulation_steps=2)
    optimizer.build([variable])
    calls = _counting(optimizer, hook)
    optimizer.apply([tf.ones(3)], [variable])
    optimizer.apply([tf.ones(3)], [variable])
    assert calls, f"Keras no longer calls Optimizer.{hook} on an accumulated update"


def test_apply_without_variables_uses_the_built_trainable_variables():
    variables = [keras.Variable(np.ones(2, np.float32)), keras.Variable(np.ones(1, np.float32))]
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(variables)
    assert [id(v) for v in compat.default_variables(optimizer)] == [id(v) for v in variables]
    optimizer.apply([tf.ones(2), tf.ones(1)])
    np.testing.assert_allclose(variables[0].numpy(), [0.9, 0.9])


def test_loss_scale_optimizer_calls_its_non_finite_handler_on_overflow():
    variable = keras.Variable(np.ones(2, np.float32))
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    optimizer.build([variable])
    calls = _counting(optimizer, "_stateful_handle_non_finite_grads")
    optimizer.apply([tf.constant([np.inf, 1.0])], [variable])
    assert calls, "LossScaleOptimizer no longer calls _stateful_handle_non_finite_grads"
    np.testing.assert_allclose(variable.numpy(), [1.0, 1.0])  # the step was skipped


def test_keras_train_step_passes_the_loss_through_scale_loss():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    calls = _counting(model.optimizer, "scale_loss")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    assert calls, "Keras' train_step no longer calls optimizer.scale_loss"


def test_make_train_function_binds_the_instance_train_step_and_metric_update_state():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    steps = _counting(model, "train_step")
    tracker = next(m for m in model.metrics if m.name == "loss")
    updates = _counting(tracker, "update_state")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), batch_size=2, verbose=0)
    assert steps, "make_train_function no longer calls the instance's train_step"
    assert updates, "Keras' train_step no longer updates the `loss` metric via update_state"


def test_flatten_layers_lists_a_custom_layers_sublayers():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="block")
            self.attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
            self.ffn = keras.layers.Dense(8, name="ffn")

    assert [layer.name for layer in compat.sublayers(Block())] == ["attention", "ffn"]


def test_distributed_variables_share_one_key_across_replicas(mirrored):
    with mirrored.scope():
        variable = keras.Variable(np.ones(2, np.float32))
    keys = {compat.variable_key(value) for value in mirrored.experimental_local_results(variable)}
    assert keys == {compat.variable_key(variable)}


def test_the_xla_query_tells_a_jit_compiled_trace_from_a_graph_and_eager():
    seen: dict[str, bool] = {}

    def probe(name: str):
        def traced() -> tf.Tensor:
            seen[name] = compat.in_xla_context()
            return tf.constant(0.0)

        return traced

    tf.function(probe("xla"), jit_compile=True)()
    tf.function(probe("graph"))()
    probe("eager")()
    assert seen == {"xla": True, "graph": False, "eager": False}
