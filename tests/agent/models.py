"""The small regression problem and model that the monitor and clip tests train."""

from __future__ import annotations

import keras
import numpy as np


def regression_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of a linear target over 6 normal features, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def small_model(seed: int = 1) -> keras.Model:
    """``net``: Dense(8, tanh) ``hidden`` then Dense(1) ``out``, seeded."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
