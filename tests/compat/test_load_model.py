"""The README's sentence: with wrap() in compile, loading needs only ``import gradwatch.agent``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SAVE = """
import keras, numpy as np, tempfile
from gradwatch.agent import GradientMonitor
monitor = GradientMonitor("saved", local_dir=tempfile.mkdtemp())
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
model.compile(optimizer=monitor.wrap(keras.optimizers.Adam(0.01)), loss="mse")
model.fit(np.ones((8, 3)), np.ones((8, 1)), verbose=0, callbacks=[monitor])
monitor.close()
model.save({path!r})
"""

LOAD = {
    "gradwatch first, keras later": """
import sys
import gradwatch.agent
assert "tensorflow" not in sys.modules  # registering must not load TensorFlow early
import keras
""",
    "keras first": """
import keras
import gradwatch.agent
""",
    "tf.keras after gradwatch": """
import gradwatch.agent
import tensorflow as tf
keras = tf.keras
""",
}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("model") / "wrapped.keras")
    result = _python(SAVE.format(path=path))
    assert result.returncode == 0, result.stderr
    return path


@pytest.mark.parametrize("imports", sorted(LOAD))
def test_load_model_of_a_wrapped_optimizer_needs_only_import_gradwatch_agent(saved, imports):
    code = (
        LOAD[imports]
        + f"""
model = keras.models.load_model({saved!r})
print(type(model.optimizer).__name__, int(model.optimizer.iterations.numpy()))
"""
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Adam", "1"]  # the plain inner optimizer, with its state
