"""A user's own model for ``gradwatch study --model tests.study.tiny_model:build``."""

from __future__ import annotations


def build(seed: int) -> dict:
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    return {"model": model, "x": x, "y": y, "batch_size": 16}


def not_a_task(seed: int) -> list:
    return [seed]


def without_data(seed: int) -> dict:
    return {"model": None}
