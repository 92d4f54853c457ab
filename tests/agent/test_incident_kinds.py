"""Incident bundles of the other kinds of bad steps, in real ``fit`` runs, replayed by the real
``gradwatch replay``: a finite explosion (the in-graph explosion trigger), dropout masks
drawn again from the step's RNG states (graph and XLA), a float16 overflow under mixed
precision, a GAN's generator fault (optimizer groups), and where a bundle's batch was in
the data (epochs).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from gradwatch.agent import GradientMonitor, clip
from gradwatch.agent.replay_bundle import open_bundle, restorer
from tests.agent.incident_helpers import (
    BAD_STEP,
    BATCH,
    assert_replayed_norms_equal_recorded,
    bundle_tensor,
    custom_loop,
    fit_planted,
    fit_with_learning_rate_jump,
    planted_data,
    planted_monitor,
    read_manifest,
    recorded_layer,
    run_replay,
    spike_monitor,
)
from tests.agent.incident_models import (
    dropout,
    linear,
    mixed_linear,
    planted_gan,
    planted_log,
    planted_overflow,
)


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
    manifest = read_manifest(bundle)
    assert manifest["cause"] == "explosion"
    assert manifest["step"] == 251
    norms = {row["step"]: float(row["global_norm"]) for row in manifest["recorded"]}
    assert norms[251] > 30 * norms[249]
    result = run_replay(bundle, "tests.agent.incident_models:linear")
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
    x, y = planted_data(zero_in_batch=None)
    monitor = spike_monitor(tmp_path, "dropout")
    fit_with_learning_rate_jump(dropout(), monitor, x, y, **options)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert [state["path"].rsplit("/", 1)[-1] for state in manifest["rng_states"]] == [
        "seed_generator_state"
    ]
    result = run_replay(bundle, "tests.agent.incident_models:dropout")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert_replayed_norms_equal_recorded(
        result.stdout, (f"{recorded_layer(bundle, 'wide')}", f"{recorded_layer(bundle, 'out')}")
    )


def test_a_custom_loop_replays_its_dropout_masks_from_the_states_on_step_kept(tmp_path):
    """A custom loop has no step-start hook: ``monitor.on_step`` copies the RNG states the
    next step begins with, so the replay draws the bad step's dropout mask again."""
    x, y = planted_data(zero_in_batch=None)
    model = dropout()
    adam = keras.optimizers.Adam(0.01)
    monitor = spike_monitor(tmp_path, "dropout-loop")

    def jump(step: int) -> None:
        if step == 12:
            adam.learning_rate.assign(30.0)

    custom_loop(model, monitor, x, y, steps=20, adam=adam, before_step=jump)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["step"] == 13
    assert len(manifest["rng_states"]) == 1
    result = run_replay(bundle, "tests.agent.incident_models:dropout")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert_replayed_norms_equal_recorded(
        result.stdout, (f"{recorded_layer(bundle, 'wide')}", f"{recorded_layer(bundle, 'out')}")
    )


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_a_float16_overflow_of_the_forward_pass_under_mixed_precision_is_captured(
    tmp_path, jit_compile
):
    """Under mixed_float16 the LossScaleOptimizer skips every step whose scaled gradient
    overflows, and halves its scale: usually nothing to see. A step whose *loss* is
    non-finite is another matter (no loss scale makes it finite): it is captured, and the
    replay names the planted float16 overflow. Under XLA the bundle rolls: the replay runs
    the steps since its copy through the LossScaleOptimizer (which passes its inner
    optimizer's ``apply`` the variables by keyword)."""
    x, y = planted_data(zero_in_batch=None)
    x[BAD_STEP * BATCH + 2, 0] = 100.0  # ×1000 in float16: Inf
    model = planted_overflow()
    if jit_compile:
        model.compile(optimizer=model.optimizer, loss="mse", jit_compile=True)
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    monitor = planted_monitor(tmp_path, incident_snapshot_every=4)
    fit_planted(model, monitor, x, y)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["cause"] == "nonfinite"
    row = manifest["recorded"][-1]
    assert row["step"] == BAD_STEP
    assert row["skipped"] is True
    assert row["loss"] in ("inf", "nan")
    assert row["loss_scale"] is not None
    captured_x = bundle_tensor(bundle, "batch", 0)[: BATCH * 4]
    np.testing.assert_array_equal(
        captured_x.reshape(BATCH, 4), x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH]
    )

    assert (manifest["roll_forward"] or {}).get("from_step") == (4 if jit_compile else None)
    result = run_replay(bundle, "tests.agent.incident_models:planted_overflow")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert f"first NaN/Inf: op Mul in layer {recorded_layer(bundle, 'amplify')}" in result.stdout, (
        result.stdout
    )
    if jit_compile:
        assert "rolled forward 3 steps from step 4" in result.stdout, result.stdout
    # The replay restores the scale training had where the restored state begins (halved at
    # every overflow since 32,768), not a rebuilt LossScaleOptimizer's initial one.
    begins = 4 if jit_compile else BAD_STEP
    (recorded,) = [r["loss_scale"] for r in manifest["recorded"] if r["step"] == begins]
    assert recorded < 32768
    rebuilt = planted_overflow()
    rebuilt.optimizer.build(rebuilt.trainable_variables)
    _, reader = open_bundle(Path(bundle))
    restorer(rebuilt, rebuilt.optimizer.inner_optimizer, manifest, reader)()
    assert float(rebuilt.optimizer.dynamic_scale.numpy()) == recorded


def test_a_finite_spike_under_mixed_precision_replays_to_the_recorded_unscaled_norms(tmp_path):
    """The LossScaleOptimizer's apply is given the scaled gradient; the replay unscales it as
    the LSO does, so its norms are the recorded (unscaled) ones, not ×16."""
    x, y = planted_data(zero_in_batch=None)
    monitor = spike_monitor(tmp_path, "mixed-spike")
    fit_with_learning_rate_jump(mixed_linear(), monitor, x, y, rate=3.0)  # ×3000 overflows

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["cause"] == "skipped"
    assert manifest["step"] == 13
    assert manifest["recorded"][-1]["loss_scale"] == 16
    result = run_replay(bundle, "tests.agent.incident_models:mixed_linear")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    layers = (recorded_layer(bundle, "hidden"), recorded_layer(bundle, "out"))
    assert_replayed_norms_equal_recorded(result.stdout, layers)


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
    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["group"] == "generator"
    assert manifest["group_variables"] == [v.path for v in gan.generator.trainable_variables]
    assert len(manifest["weights"]) == len(gan.trainable_variables)  # both networks
    recorded = dict(zip(manifest["layers"], manifest["recorded"][-1]["grad_norm"], strict=True))

    result = run_replay(bundle, "tests.agent.incident_models:planted_gan")

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


def test_a_bundle_says_where_its_batch_was_in_theplanted_data(tmp_path):
    """Two epochs of 12 batches with log(0) in batch 7: the second bundle is step 19, batch 7
    of epoch 1 (what a user seeks in the dataset), and every recorded row has its position."""
    x, y = planted_data()
    monitor = planted_monitor(tmp_path, max_incidents=2)
    planted_log().fit(
        x[: 12 * BATCH], y[: 12 * BATCH], batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
        callbacks=[monitor],
    )  # fmt: skip
    monitor.close()

    first, second = (read_manifest(bundle) for bundle in monitor.incidents)
    assert (first["step"], first["position"]) == (7, {"epoch": 0, "step_in_epoch": 7})
    assert (second["step"], second["position"]) == (19, {"epoch": 1, "step_in_epoch": 7})
    rows = {row["step"]: (row["epoch"], row["step_in_epoch"]) for row in second["recorded"]}
    assert rows[11] == (0, 11)
    assert rows[12] == (1, 0)
    result = run_replay(monitor.incidents[1], "tests.agent.incident_models:planted_log")
    assert "step 19 (non-finite gradient; epoch 1, step 7 of it)" in result.stdout
