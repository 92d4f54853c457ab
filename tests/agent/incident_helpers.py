"""What the incident tests share: the planted-fault data, the monitor they use, a fit that
keeps the weights before the bad step, and the real ``gradwatch replay`` command (run in this
process, and as its own process)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

from gradwatch.agent import GradientMonitor, clip
from gradwatch.agent.replay_bundle import open_bundle, read_tensor
from gradwatch.server.cli import app

BAD_STEP = 7
BATCH = 16

_SCRIPT = Path(sys.executable).with_name("gradwatch")
GRADWATCH = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("gradwatch") or "gradwatch"]
ROOT = Path(__file__).parents[2]


def planted_data(zero_in_batch: int | None = BAD_STEP, nan_in_batch: int | None = None):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(20 * BATCH, 4)).astype("float32")
    y = rng.normal(size=(20 * BATCH, 1)).astype("float32")
    if zero_in_batch is not None:
        x[zero_in_batch * BATCH + 3, 2] = 0.0  # log(0) = -inf in that step's forward pass
    if nan_in_batch is not None:
        x[nan_in_batch * BATCH + 5, 1] = np.nan
    return x, y


def planted_monitor(tmp_path: Path, **settings) -> GradientMonitor:
    return GradientMonitor(
        run="planted",
        policy=clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0)),
        flush_every=4,
        local_dir=str(tmp_path / "runs"),
        **settings,
    )


def spike_monitor(tmp_path: Path, run: str) -> GradientMonitor:
    """A monitor whose ``skip_spike`` skips (and captures) the finite spike that follows a
    learning-rate jump (:func:`fit_with_learning_rate_jump`)."""
    return GradientMonitor(
        run=run,
        policy=clip.skip_spike(sigma=6.0, window=16, min_history=8),
        flush_every=4,
        local_dir=str(tmp_path / "runs"),
    )


def fit_with_learning_rate_jump(model, monitor, x, y, rate=30.0, **compile_options) -> None:
    """fit (batches of ``BATCH``, one epoch, in order) with the learning rate ``rate`` (30: ×3000
    of Adam(0.01)'s) from step 12 (a finite spike ``skip_spike`` skips); then close the
    monitor."""

    class JumpAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 12:
                self.model.optimizer.learning_rate.assign(rate)

    if compile_options:
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", **compile_options)
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[JumpAt(), monitor]
    )
    monitor.close()


def fit_planted(model, monitor, x, y, **compile_options):
    if compile_options:
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", **compile_options)
    weights_before = None

    class KeepWeights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            nonlocal weights_before
            if batch == BAD_STEP:
                weights_before = [w.copy() for w in self.model.get_weights()]

    callbacks = (
        [monitor]
        if compile_options.get("steps_per_execution", 1) > 1
        else [
            KeepWeights(),
            monitor,
        ]
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    monitor.close()
    return weights_before


def run_replay_command(bundle: str, model_fn: str) -> subprocess.CompletedProcess[str]:
    """The real ``gradwatch replay`` console script, in a fresh process (as after a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update({"COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)})
    return subprocess.run(
        [*GRADWATCH, "replay", bundle, "--model-fn", model_fn],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


@dataclass(frozen=True)
class Replayed:
    returncode: int
    stdout: str
    stderr: str


def run_replay(bundle: str, model_fn: str) -> Replayed:
    """``gradwatch replay`` in this process, the one that trained (as in a notebook): the
    rebuilt model's layers get Keras' unique names (``sequential_1``), the report must not.
    Saves a process start and TensorFlow's import (~4 s) per replay."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("GRADWATCH_")}
    result = CliRunner().invoke(
        app, ["replay", bundle, "--model-fn", model_fn], env={**unset, "COLUMNS": "200"}
    )
    stderr = result.stderr
    error = result.exception
    if error is not None and not isinstance(error, SystemExit):
        stderr += "".join(traceback.format_exception(error))
    return Replayed(result.exit_code, result.stdout, stderr)


def read_manifest(bundle: str) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


def custom_loop(model, monitor, x, y, steps: int, adam=None, before_step=None) -> None:
    """Train ``model`` for ``steps`` batches of ``BATCH`` in a custom loop (MSE, a wrapped
    ``adam``, default ``Adam(0.01)``), offering each batch to the capture; then close."""
    optimizer = monitor.wrap(adam or keras.optimizers.Adam(0.01))
    monitor.set_model(model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        monitor.capture_batch((xb, yb))

    for step in range(steps):
        if before_step is not None:
            before_step(step)
        train_step(x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH])
        monitor.on_step()
    monitor.close()


def assert_replayed_norms_equal_recorded(stdout: str, layers: tuple[str, ...]) -> None:
    """Each of ``layers``' replayed norm equals its recorded one in the replay's table."""
    for layer in layers:
        line = next(row for row in stdout.splitlines() if layer in row)
        replayed, _, recorded = (float(v) for v in line.split("│")[2:5])
        assert replayed == pytest.approx(recorded, rel=1e-5), line


def recorded_layer(bundle: str, layer: str) -> str:
    """``layer``'s path as training named it: under the model's name, which Keras makes
    unique in a process (``sequential_3``), and which the replay must report."""
    root = read_manifest(bundle)["weights"][0]["path"].split("/", 1)[0]
    return f"{root}/{layer}"


def bundle_tensor(bundle: str, kind: str, index: int) -> np.ndarray:
    """Variable ``kind/index`` of a bundle's checkpoint (``weights``, ``batch``, …), read the
    way ``gradwatch replay`` reads it."""
    _, reader = open_bundle(Path(bundle))
    return read_tensor(reader, kind, index)


def bundle_tensors(bundle: str, kind: str) -> list[np.ndarray]:
    """Every ``kind/i`` of a bundle's checkpoint, in order of ``i``."""
    _, reader = open_bundle(Path(bundle))
    count = sum(
        1
        for name in reader.get_variable_to_shape_map()
        if re.fullmatch(rf"{kind}/\d+/\.ATTRIBUTES/VARIABLE_VALUE", name)
    )
    return [read_tensor(reader, kind, index) for index in range(count)]
