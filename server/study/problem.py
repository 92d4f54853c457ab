"""The problems a study trains: two built in, or the user's own (``--model module:function``).

A :class:`Problem` builds a fresh :class:`Task` (a new model with its initial weights, and
the data) for every cell from the study's seed, so every cell of a study starts from the same
weights and sees the same batches.

Built in, both generated here (nothing is downloaded) and sized to train in seconds on a CPU:

* ``rnn``: three stacked ``SimpleRNN(32)`` (tanh, no gating, no normalisation) reading
  50-step sequences of Gaussian noise; the target is a leaky integral of the whole sequence,
  ``y = Σ_t 0.9^(49−t) x_t``, scaled to unit variance. Backpropagation runs through 50 steps
  of three recurrences: the classic exploding-gradient setting (Pascanu et al. 2013).
* ``mlp``: twelve ``Dense(64, relu)`` layers (He initialisation, no normalisation, no
  residuals) regressing ``tanh(x·w/√32) + noise`` from 32 Gaussian inputs.

``--model module:function`` imports ``module`` (from the current directory or the Python
path) and calls ``function(seed)`` once per cell and once per warm-up, with ``seed`` an
``int``. It must return a :class:`Task`, or a mapping with the same keys: ``model`` (a
*new*, uncompiled ``keras.Model`` each call, built, i.e. with its weights), ``x`` and ``y``
(training inputs and targets, anything ``tf.data.Dataset.from_tensor_slices`` takes, first
axis = examples), and optionally ``x_val``/``y_val`` (held-out data for the final loss;
default: the training data), ``loss`` (anything ``model.compile`` takes; default ``"mse"``)
and ``batch_size`` (default 32). It should seed what it draws from ``seed``; the study calls
``keras.utils.set_random_seed(seed)`` before each call.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BUILT_IN", "DEFAULT_RATES", "Problem", "ProblemError", "Task", "load_problem"]


class ProblemError(Exception):
    """``--model`` names no importable function, or the function broke its contract."""


@dataclass(frozen=True, slots=True)
class Task:
    """A fresh model and its data, for one cell.

    Attributes:
        model: A built, uncompiled ``keras.Model`` with its initial weights.
        x: Training inputs (first axis: examples).
        y: Training targets.
        x_val: Held-out inputs for the final loss.
        y_val: Held-out targets.
        loss: The loss, as ``model.compile`` takes it.
        batch_size: Examples per step.
    """

    model: Any
    x: Any
    y: Any
    x_val: Any
    y_val: Any
    loss: Any = "mse"
    batch_size: int = 32


@dataclass(frozen=True, slots=True)
class Problem:
    """A model and data to study.

    Attributes:
        name: ``rnn``, ``mlp`` or ``module:function``.
        description: One line on the model and the data.
        build: ``build(seed)`` → a fresh :class:`Task`.
        rates: Per optimizer, its (low, high) learning rate: low trains; high makes
            unclipped SGD explode after the warm-up (the built-in problems' SGD rates were
            chosen so: the RNN at step ~100 of 250, the MLP at step ~23), and is 30–100× the
            low rate for the adaptive optimizers, whose step size does not grow with the
            gradient.
        steps: Default training steps per cell.
    """

    name: str
    description: str
    build: Callable[[int], Task]
    rates: Mapping[str, tuple[float, float]]
    steps: int


DEFAULT_RATES: Mapping[str, tuple[float, float]] = {
    "sgd": (0.01, 0.1),
    "adagrad": (0.01, 1.0),
    "rmsprop": (0.001, 0.1),
    "adam": (0.001, 0.1),
}
"""(low, high) learning rates for a user's model, unless ``--rates`` says otherwise."""


def _split(x: Any, y: Any, n_val: int) -> tuple[Any, Any, Any, Any]:
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


def _rnn_task(seed: int) -> Task:
    import keras
    import numpy as np

    steps, decay, n = 50, 0.9, 5120
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, steps, 1)).astype("float32")
    y = x[..., 0] @ (decay ** np.arange(steps)[::-1])
    y = (y / y.std())[:, None].astype("float32")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((steps, 1)),
            keras.layers.SimpleRNN(32, return_sequences=True, name="rnn_1"),
            keras.layers.SimpleRNN(32, return_sequences=True, name="rnn_2"),
            keras.layers.SimpleRNN(32, name="rnn_3"),
            keras.layers.Dense(1, name="output"),
        ],
        name="deep_rnn",
    )
    return Task(model, *_split(x, y, 1024))


def _mlp_task(seed: int) -> Task:
    import keras
    import numpy as np

    inputs, n = 32, 5120
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    w = rng.normal(size=(inputs, 1)).astype("float32")
    y = (np.tanh(x @ w / np.sqrt(inputs)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    keras.utils.set_random_seed(seed)
    hidden = [
        keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal", name=f"d{i}")
        for i in range(1, 13)
    ]
    model = keras.Sequential(
        [keras.Input((inputs,)), *hidden, keras.layers.Dense(1, name="output")],
        name="deep_mlp",
    )
    return Task(model, *_split(x, y, 1024))


BUILT_IN: Mapping[str, Problem] = {
    "rnn": Problem(
        name="rnn",
        description="3 × SimpleRNN(32), 50-step sequences, target a leaky integral "
        "(decay 0.9) of the input; MSE",
        build=_rnn_task,
        rates={
            "sgd": (0.01, 0.08),
            "adagrad": (0.03, 1.0),
            "rmsprop": (0.001, 0.1),
            "adam": (0.001, 0.1),
        },
        steps=250,
    ),
    "mlp": Problem(
        name="mlp",
        description="12 × Dense(64, relu), He init, no normalisation; 32 inputs, target "
        "tanh(x·w/√32) + noise; MSE",
        build=_mlp_task,
        rates={
            "sgd": (0.01, 0.03),
            "adagrad": (0.01, 1.0),
            "rmsprop": (0.001, 0.03),
            "adam": (0.001, 0.1),
        },
        steps=300,
    ),
}
"""The built-in problems, by ``--problem`` name."""


def _task_from(value: object, where: str) -> Task:
    if isinstance(value, Task):
        return value
    if not isinstance(value, Mapping):
        raise ProblemError(f"{where} returned {type(value).__name__}, not a Task or a mapping")
    missing = sorted({"model", "x", "y"} - set(value))
    if missing:
        raise ProblemError(f"{where} returned a mapping without {', '.join(missing)}")
    unknown = sorted(set(value) - {"model", "x", "y", "x_val", "y_val", "loss", "batch_size"})
    if unknown:
        raise ProblemError(f"{where} returned unknown keys: {', '.join(unknown)}")
    has_val = "x_val" in value and "y_val" in value
    return Task(
        model=value["model"],
        x=value["x"],
        y=value["y"],
        x_val=value["x_val"] if has_val else value["x"],
        y_val=value["y_val"] if has_val else value["y"],
        loss=value.get("loss", "mse"),
        batch_size=int(value.get("batch_size", 32)),
    )


def _user_problem(spec: str) -> Problem:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ProblemError(f"--model: expected module:function, got {spec!r}")
    if os.getcwd() not in sys.path:  # console scripts do not put the cwd on the path
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ProblemError(f"--model: cannot import {module_name!r}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ProblemError(f"--model: {module_name!r} has no function {function_name!r}")

    def build(seed: int) -> Task:
        return _task_from(function(seed), f"{spec}({seed})")

    return Problem(
        name=spec,
        description=f"the model and data of {spec}",
        build=build,
        rates=DEFAULT_RATES,
        steps=300,
    )


def load_problem(problem: str, model: str | None) -> Problem:
    """The built-in ``problem``, or the user's ``model`` (``module:function``) when given.

    Imports the user's module (which may import TensorFlow); otherwise imports nothing.

    Raises:
        ProblemError: An unknown problem, or a ``model`` that cannot be imported.
    """
    if model is not None:
        return _user_problem(model)
    try:
        return BUILT_IN[problem]
    except KeyError:
        raise ProblemError(
            f"--problem: expected one of {', '.join(BUILT_IN)}, got {problem!r}"
        ) from None
