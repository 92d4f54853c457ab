"""Incident capture where one step is more than one batch on one device: under
``tf.distribute.MirroredStrategy`` (two logical CPUs) the bundle of the planted log(0) step
holds the global batch (both replicas' shards, in order) and the same weights and optimizer
state as the one-device bundle, and one device replays it; with
``gradient_accumulation_steps`` it holds the last micro-batch and the others' gradient sum.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from tests.agent.incident_helpers import (
    BAD_STEP,
    BATCH,
    assert_replayed_norms_equal_recorded,
    bundle_tensor,
    bundle_tensors,
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
    planted_log,
    planted_log_accumulating,
    planted_overflow,
)


def _bundle(tmp_path: Path, x, y, strategy=None):
    """Fit the planted model (under ``strategy``) and return its one bundle, read."""
    if strategy is None:
        model = planted_log()
    else:
        with strategy.scope():
            model = planted_log()
    monitor = planted_monitor(tmp_path)
    weights_before = fit_planted(model, monitor, x, y)
    (bundle,) = monitor.incidents
    return bundle, weights_before


def test_a_planted_fault_under_mirrored_strategy_is_captured_like_on_one_device(tmp_path, mirrored):
    x, y = planted_data()
    x[BAD_STEP * BATCH + 11, 1] = 0.0  # a second log(0), in replica 1's half of the batch
    single, _ = _bundle(tmp_path / "one", x, y)
    bundle, weights_before = _bundle(tmp_path / "two", x, y, mirrored)

    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["cause"] == "nonfinite"
    assert manifest["replicas"] == 2
    assert read_manifest(single)["replicas"] == 1
    # The global batch, both shards in their order.
    captured = bundle_tensor(bundle, "batch", 0)
    np.testing.assert_array_equal(
        captured.reshape(BATCH, 4), x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH]
    )
    np.testing.assert_array_equal(bundle_tensor(bundle, "batch_shape", 0), [BATCH, 4])
    # The weights just before the update, as the replicas held them and as one device did.
    weights = bundle_tensors(bundle, "weights")
    for got, expected in zip(weights, weights_before, strict=True):
        np.testing.assert_array_equal(got, expected)
    for prefix in ("weights", "optimizer"):
        for got, expected in zip(
            bundle_tensors(bundle, prefix), bundle_tensors(single, prefix), strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=prefix)

    result = run_replay(bundle, "tests.agent.incident_models:planted_log")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout
    assert "captured on 2 replicas (tf.distribute), replayed shard by shard" in result.stdout
    assert f"first NaN/Inf: op Log in layer {recorded_layer(bundle, 'log')}" in result.stdout


def test_healthy_steps_under_mirrored_strategy_write_no_bundle(tmp_path, mirrored):
    x, y = planted_data(zero_in_batch=None)
    with mirrored.scope():
        model = planted_log()
    monitor = planted_monitor(tmp_path)
    fit_planted(model, monitor, x, y)
    assert monitor.incidents == ()


@pytest.mark.parametrize(
    ("micro", "traced"),
    [(2 * BAD_STEP + 1, True), (2 * BAD_STEP, False)],
    ids=["fault-in-the-last-micro-batch", "fault-in-an-earlier-micro-batch"],
)
def test_an_accumulated_step_is_captured_with_its_last_micro_batch_and_replayed(
    tmp_path, micro, traced
):
    """``gradient_accumulation_steps=2``: update ``BAD_STEP`` averages micro-batches
    ``2·BAD_STEP`` and ``2·BAD_STEP + 1``. The bundle holds the last micro-batch and the
    optimizer's accumulators (the first one's gradient); the replay adds them as Keras does,
    and traces the op when the fault is in the last micro-batch, or says it was earlier."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(40 * BATCH, 4)).astype("float32")
    y = rng.normal(size=(40 * BATCH, 1)).astype("float32")
    x[micro * BATCH + 3, 2] = 0.0  # log(0) in that micro-batch
    model = planted_log_accumulating()
    monitor = planted_monitor(tmp_path)
    weights = {}

    class KeepWeights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2 * BAD_STEP + 1:  # the update's last micro-batch: weights unchanged
                weights["before"] = [w.copy() for w in self.model.get_weights()]

    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        callbacks=[KeepWeights(), monitor],
    )  # fmt: skip
    monitor.close()

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["gradient_accumulation_steps"] == 2
    last = x[(2 * BAD_STEP + 1) * BATCH : (2 * BAD_STEP + 2) * BATCH]
    np.testing.assert_array_equal(bundle_tensor(bundle, "batch", 0).reshape(BATCH, 4), last)
    for got, expected in zip(bundle_tensors(bundle, "weights"), weights["before"], strict=True):
        np.testing.assert_array_equal(got, expected)

    result = run_replay(bundle, "tests.agent.incident_models:planted_log_accumulating")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reproduced: yes" in out
    assert "the step averaged 2 micro-batches" in out
    if traced:
        assert f"first NaN/Inf: op Log in layer {recorded_layer(bundle, 'log')}" in out
        assert "earlier micro-batches' gradient already holds" not in out
    else:
        assert "the earlier micro-batches' gradient already holds" in out
        assert f"in {recorded_layer(bundle, 'hidden')}: the fault is in one of them" in out


def test_a_float16_overflow_under_mirrored_strategy_is_captured_with_the_global_batch(
    tmp_path, mirrored
):
    """Under MirroredStrategy the LossScaleOptimizer decides a step overflowed in
    cross-replica context; a step whose loss is non-finite (here on the second replica only:
    the all-reduced loss is) is captured there like on one device: the global batch, and the
    state the skipped update left untouched."""
    x, y = planted_data(zero_in_batch=None)
    x[BAD_STEP * BATCH + 13, 3] = 100.0  # ×1000 in float16: Inf, in replica 1's shard only
    with mirrored.scope():
        model = planted_overflow()
    monitor = planted_monitor(tmp_path)
    weights_before = fit_planted(model, monitor, x, y)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["cause"] == "nonfinite"
    assert manifest["replicas"] == 2
    assert manifest["recorded"][-1]["skipped"] is True
    np.testing.assert_array_equal(
        bundle_tensor(bundle, "batch", 0).reshape(BATCH, 4),
        x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH],
    )
    for got, expected in zip(bundle_tensors(bundle, "weights"), weights_before, strict=True):
        np.testing.assert_array_equal(got, expected)

    result = run_replay(bundle, "tests.agent.incident_models:planted_overflow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert "captured on 2 replicas (tf.distribute), replayed shard by shard" in result.stdout
    amplify = recorded_layer(bundle, "amplify")
    assert f"first NaN/Inf: op Mul in layer {amplify}" in result.stdout, result.stdout


def test_dropout_under_mirrored_strategy_is_replayed_shard_by_shard(tmp_path, mirrored):
    """Each replica draws its dropout mask for its own shard from the same RNG state, so the
    replay runs the step on each shard from the captured state and averages their gradients
    as the all-reduce did: the recorded norms come back, layer by layer."""
    x, y = planted_data(zero_in_batch=None)
    with mirrored.scope():
        model = dropout()
    monitor = spike_monitor(tmp_path, "dropout-mirrored")
    fit_with_learning_rate_jump(model, monitor, x, y)

    (bundle,) = monitor.incidents
    assert read_manifest(bundle)["replicas"] == 2
    result = run_replay(bundle, "tests.agent.incident_models:dropout")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert "captured on 2 replicas (tf.distribute), replayed shard by shard" in result.stdout
    layers = (recorded_layer(bundle, "wide"), recorded_layer(bundle, "out"))
    assert_replayed_norms_equal_recorded(result.stdout, layers)
