"""Incident bundles: planted faults in real ``fit`` runs and custom loops, captured before the
bad step's update and replayed by the real ``gradwatch replay`` command.

Faults: ``log`` of a value that reaches 0 in one layer at a known step (graph, XLA with
``steps_per_execution``), a batch with a NaN in its data, and a custom loop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import ConfigError, GradientMonitor, clip
from tests.agent.incident_models import (
    dropout,
    linear,
    plain,
    planted_gan,
    planted_log,
    planted_overflow,
)

BAD_STEP = 7
BATCH = 16

_SCRIPT = Path(sys.executable).with_name("gradwatch")
GRADWATCH = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("gradwatch") or "gradwatch"]
ROOT = Path(__file__).parents[2]


def _data(zero_in_batch: int | None = BAD_STEP, nan_in_batch: int | None = None):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(20 * BATCH, 4)).astype("float32")
    y = rng.normal(size=(20 * BATCH, 1)).astype("float32")
    if zero_in_batch is not None:
        x[zero_in_batch * BATCH + 3, 2] = 0.0  # log(0) = -inf in that step's forward pass
    if nan_in_batch is not None:
        x[nan_in_batch * BATCH + 5, 1] = np.nan
    return x, y


def _monitor(tmp_path: Path, **settings) -> GradientMonitor:
    return GradientMonitor(
        run="planted",
        policy=clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0)),
        flush_every=4,
        local_dir=str(tmp_path / "runs"),
        **settings,
    )


def _fit(model, monitor, x, y, **compile_options):
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


def _replay(bundle: str, model_fn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update({"COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)})
    return subprocess.run(
        [*GRADWATCH, "replay", bundle, "--model-fn", model_fn],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _manifest(bundle: str) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


@pytest.mark.parametrize(
    "options",
    [{}, {"jit_compile": True, "steps_per_execution": 4}],
    ids=["graph", "xla-steps_per_execution-4"],
)
def test_planted_log_of_zero_is_captured_before_its_update_and_replay_names_the_op(
    tmp_path, options
):
    x, y = _data()
    model = planted_log()
    monitor = _monitor(tmp_path)

    weights_before = _fit(model, monitor, x, y, **options)

    (bundle,) = monitor.incidents
    manifest = _manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["cause"] == "nonfinite"
    assert manifest["batch"]["structure"] == "x,y"
    assert manifest["recorded"][-1]["step"] == BAD_STEP
    assert manifest["recorded"][-1]["global_norm"] == "nan"
    reader = tf.train.load_checkpoint(str(Path(bundle) / manifest["checkpoint"]))
    captured_x = reader.get_tensor("batch/0/.ATTRIBUTES/VARIABLE_VALUE")[: BATCH * 4]
    np.testing.assert_array_equal(
        captured_x.reshape(BATCH, 4), x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH]
    )
    if weights_before is not None:  # the weights just before the bad step's update
        for index, expected in enumerate(weights_before):
            got = reader.get_tensor(f"weights/{index}/.ATTRIBUTES/VARIABLE_VALUE")
            np.testing.assert_array_equal(got, expected)

    result = _replay(bundle, "tests.agent.incident_models:planted_log")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reproduced: yes" in out
    assert "first NaN/Inf: op Log in layer sequential/log" in out
    assert "incident_models.py" in out
    assert "return tf.math.log(x)" in out
    hidden = next(line for line in out.splitlines() if "sequential/hidden" in line)
    assert "nan" in hidden  # the layer after log: NaN replayed, NaN recorded
    out_row = next(line for line in out.splitlines() if "sequential/out" in line)
    assert float(out_row.split("│")[6]) > 0  # its largest finite |g|
    assert "global_norm" in out
    assert "by_value" in out
    assert "zclip" in out


def test_a_nan_in_the_data_is_traced_to_the_first_layer_that_reads_it(tmp_path):
    x, y = _data(zero_in_batch=None, nan_in_batch=BAD_STEP)
    model = plain()
    monitor = _monitor(tmp_path)
    _fit(model, monitor, x, y)

    (bundle,) = monitor.incidents
    result = _replay(bundle, "tests.agent.incident_models:plain")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout
    assert "the batch itself holds 1 NaN/Inf value(s) in x" in result.stdout
    assert "first NaN/Inf: op MatMul in layer sequential/hidden" in result.stdout


def test_a_learning_rate_jump_skipped_by_skip_spike_is_captured_and_reproduced(tmp_path):
    """Finite gradients: the bundle is of the first step the policy skipped, and the replay
    gives the recorded global norm back (no op made a NaN/Inf)."""
    x, y = _data(zero_in_batch=None)
    model = linear()
    monitor = GradientMonitor(
        run="lr-jump",
        policy=clip.skip_spike(sigma=6.0, window=16, min_history=8),
        flush_every=4,
        local_dir=str(tmp_path / "runs"),
    )

    class JumpAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 12:
                self.model.optimizer.learning_rate.assign(30.0)

    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[JumpAt(), monitor]
    )
    monitor.close()

    (bundle,) = monitor.incidents
    manifest = _manifest(bundle)
    assert manifest["cause"] == "skipped"
    assert manifest["step"] == 13  # the step after the jump: its gradient is the spike
    result = _replay(bundle, "tests.agent.incident_models:linear")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout
    assert "first NaN/Inf: none" in result.stdout
    # The flight recorder kept the rate each update applied: the jump is named.
    rates = {row["step"]: row["learning_rate"] for row in manifest["recorded"]}
    assert rates[11] == pytest.approx(0.01)
    assert rates[12] == rates[13] == 30.0
    assert "30 from step 12 (×3000)" in result.stdout, result.stdout


def _jump_learning_rate(model, monitor, x, y, **compile_options) -> None:
    """fit with the learning rate ×3000 from step 12 (a finite spike ``skip_spike`` skips)."""

    class JumpAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 12:
                self.model.optimizer.learning_rate.assign(30.0)

    if compile_options:
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", **compile_options)
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[JumpAt(), monitor]
    )
    monitor.close()


def test_an_explosion_with_finite_gradients_is_captured_where_the_server_calls_it_critical(
    tmp_path,
):
    """No skip policy, no NaN: 250 healthy steps (the 200-sample warm-up and then some, no
    capture), then the learning rate ×300,000. The next step's gradient is a critical explosion
    by the server's rule, captured in-graph before its update."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(270 * 4, 4)).astype("float32")
    y = rng.normal(size=(270 * 4, 1)).astype("float32")
    monitor = GradientMonitor(run="explosion", flush_every=16, local_dir=str(tmp_path / "runs"))

    class JumpAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 250:
                self.model.optimizer.learning_rate.assign(3000.0)

    linear().fit(
        x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[JumpAt(), monitor]
    )
    monitor.close()

    (bundle,) = monitor.incidents
    manifest = _manifest(bundle)
    assert manifest["cause"] == "explosion"
    assert manifest["step"] == 251
    norms = {row["step"]: float(row["global_norm"]) for row in manifest["recorded"]}
    assert norms[251] > 30 * norms[249]
    result = _replay(bundle, "tests.agent.incident_models:linear")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 251 (exploding gradient; epoch 0, step 251 of it)" in result.stdout
    assert "reproduced: yes" in result.stdout, result.stdout

    off = GradientMonitor(
        run="explosion", flush_every=16, local_dir=str(tmp_path / "off"),
        incident_on_explosion=False,
    )  # fmt: skip
    linear().fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[JumpAt(), off])
    off.close()
    assert off.incidents == ()


@pytest.mark.parametrize("options", [{}, {"jit_compile": True}], ids=["graph", "xla"])
def test_dropout_masks_are_replayed_from_the_rng_states_at_the_step_start(tmp_path, options):
    """The bundle holds the seed generators' states from the start of the bad step, so the
    replay draws the same dropout mask and gives the recorded norms back, layer by layer."""
    x, y = _data(zero_in_batch=None)
    monitor = GradientMonitor(
        run="dropout",
        policy=clip.skip_spike(sigma=6.0, window=16, min_history=8),
        flush_every=4,
        local_dir=str(tmp_path / "runs"),
    )
    _jump_learning_rate(dropout(), monitor, x, y, **options)

    (bundle,) = monitor.incidents
    manifest = _manifest(bundle)
    assert [state["path"].rsplit("/", 1)[-1] for state in manifest["rng_states"]] == [
        "seed_generator_state"
    ]
    result = _replay(bundle, "tests.agent.incident_models:dropout")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    for layer in ("sequential/wide", "sequential/out"):
        line = next(row for row in result.stdout.splitlines() if layer in row)
        replayed, _, recorded = (float(v) for v in line.split("│")[2:5])
        assert replayed == pytest.approx(recorded, rel=1e-5), line


def test_a_custom_loop_captures_the_batch_it_offers(tmp_path):
    x, y = _data()
    model = planted_log()
    monitor = _monitor(tmp_path)
    optimizer = monitor.wrap(keras.optimizers.Adam(0.01))
    monitor.set_model(model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        monitor.capture_batch((xb, yb))
        return loss

    for step in range(12):
        train_step(x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH])
        monitor.on_step()
    monitor.close()

    (bundle,) = monitor.incidents
    assert _manifest(bundle)["step"] == BAD_STEP
    result = _replay(bundle, "tests.agent.incident_models:planted_log")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first NaN/Inf: op Log" in result.stdout


def test_only_max_incidents_bundles_are_written_and_zero_turns_capture_off(tmp_path):
    x, y = _data()
    x[12 * BATCH, 0] = 0.0  # a second bad step
    for limit, expected in ((0, 0), (1, 1), (2, 2)):
        model = planted_log()
        monitor = _monitor(tmp_path / str(limit), max_incidents=limit)
        _fit(model, monitor, x, y)
        assert len(monitor.incidents) == expected


def test_a_replay_of_a_bundle_with_the_wrong_model_says_so(tmp_path):
    x, y = _data()
    model = planted_log()
    monitor = _monitor(tmp_path)
    _fit(model, monitor, x, y)
    (bundle,) = monitor.incidents

    wrong = _replay(bundle, "tests.agent.incident_models:wide")
    missing = _replay(str(tmp_path), "tests.agent.incident_models:plain")

    assert wrong.returncode == 2
    assert "is --model-fn building the same model" in wrong.stderr
    assert missing.returncode == 2
    assert "no readable manifest.json" in missing.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_incidents", -1),
        ("incident_max_bytes", 0),
        ("recorder_steps", 0),
        ("incident_on_explosion", "yes"),
    ],
)
def test_incident_settings_are_checked_at_construction(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        GradientMonitor(run="x", local_dir=str(tmp_path), **{name: value})


def test_a_float16_overflow_of_the_forward_pass_under_mixed_precision_is_captured(tmp_path):
    """Under mixed_float16 the LossScaleOptimizer skips every step whose scaled gradient
    overflows, and halves its scale: usually nothing to see. A step whose *loss* is
    non-finite is another matter (no loss scale makes it finite): it is captured, and the
    replay names the planted float16 overflow."""
    x, y = _data(zero_in_batch=None)
    x[BAD_STEP * BATCH + 2, 0] = 100.0  # ×1000 in float16: Inf
    model = planted_overflow()
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    monitor = _monitor(tmp_path)
    _fit(model, monitor, x, y)

    (bundle,) = monitor.incidents
    manifest = _manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["cause"] == "nonfinite"
    row = manifest["recorded"][-1]
    assert row["step"] == BAD_STEP
    assert row["skipped"] is True
    assert row["loss"] in ("inf", "nan")
    assert row["loss_scale"] is not None
    reader = tf.train.load_checkpoint(str(Path(bundle) / manifest["checkpoint"]))
    captured_x = reader.get_tensor("batch/0/.ATTRIBUTES/VARIABLE_VALUE")[: BATCH * 4]
    np.testing.assert_array_equal(
        captured_x.reshape(BATCH, 4), x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH]
    )

    result = _replay(bundle, "tests.agent.incident_models:planted_overflow")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert "first NaN/Inf: op Mul in layer sequential/amplify" in result.stdout, result.stdout


def test_a_gan_generator_fault_is_captured_for_its_group_and_replayed_exactly(tmp_path):
    """keras-io's DCGAN with both optimizers as groups: the generator's gradient goes NaN at
    step 7 (after the discriminator's update in the same step). The bundle holds every
    weight as the generator's gradient saw them and the seed generator's state from the
    step's start, so the replay draws the same latent vectors and gives the recorded norms
    of the generator's finite layer back."""
    monitor = GradientMonitor(
        run="gan", policy=clip.skip_nonfinite(), flush_every=4, local_dir=str(tmp_path / "runs")
    )
    gan = planted_gan(lambda optimizer, group: monitor.wrap(optimizer, group=group))
    fault = gan.generator.get_layer("fault")

    class FaultAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            fault.armed.assign(1.0 if batch == BAD_STEP else 0.0)

    images = np.random.default_rng(0).uniform(size=(12 * 8, 8, 8, 1)).astype("float32")
    gan.fit(
        images, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[FaultAt(), monitor]
    )
    monitor.close()

    (bundle,) = monitor.incidents
    manifest = _manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["group"] == "generator"
    assert manifest["group_variables"] == [v.path for v in gan.generator.trainable_variables]
    assert len(manifest["weights"]) == len(gan.trainable_variables)  # both networks
    recorded = dict(zip(manifest["layers"], manifest["recorded"][-1]["grad_norm"], strict=True))

    result = _replay(bundle, "tests.agent.incident_models:planted_gan")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reproduced: yes" in out, out
    assert "first NaN/Inf: op SelectV2 outside any layer's call (backpropagation" in out, out
    assert 'return upstream * tf.where(broken, float("nan"), 1.0)' in out
    deconv = next(line for line in out.splitlines() if "generator/deconv" in line)
    replayed = float(deconv.split("│")[2])
    assert replayed == pytest.approx(float(recorded["generator/deconv"]), rel=1e-5), deconv
    project = next(line for line in out.splitlines() if "generator/project" in line)
    assert "nan" in project


def test_a_bundle_says_where_its_batch_was_in_the_data(tmp_path):
    """Two epochs of 12 batches with log(0) in batch 7: the second bundle is step 19, batch 7
    of epoch 1 (what a user seeks in the dataset), and every recorded row has its position."""
    x, y = _data()
    monitor = _monitor(tmp_path, max_incidents=2)
    planted_log().fit(
        x[: 12 * BATCH], y[: 12 * BATCH], batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
        callbacks=[monitor],
    )  # fmt: skip
    monitor.close()

    first, second = (_manifest(bundle) for bundle in monitor.incidents)
    assert (first["step"], first["position"]) == (7, {"epoch": 0, "step_in_epoch": 7})
    assert (second["step"], second["position"]) == (19, {"epoch": 1, "step_in_epoch": 7})
    rows = {row["step"]: (row["epoch"], row["step_in_epoch"]) for row in second["recorded"]}
    assert rows[11] == (0, 11)
    assert rows[12] == (1, 0)
    result = _replay(monitor.incidents[1], "tests.agent.incident_models:planted_log")
    assert "step 19 (non-finite gradient; epoch 1, step 7 of it)" in result.stdout
