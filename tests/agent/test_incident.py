"""Incident bundles: planted faults in real ``fit`` runs and custom loops, captured before the
bad step's update and replayed by the real ``gradwatch replay`` command.

Faults: ``log`` of a value that reaches 0 in one layer at a known step (graph, XLA with
``steps_per_execution``), a batch with a NaN in its data, a learning-rate jump a skip
policy skips, and a custom loop; the limits and settings of capture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradwatch.agent import ConfigError, GradientMonitor
from gradwatch.agent.local import read_run_file
from gradwatch.agent.replay import replay
from tests.agent.incident_helpers import (
    BAD_STEP,
    BATCH,
    bundle_tensor,
    bundle_tensors,
    custom_loop,
    fit_planted,
    fit_with_learning_rate_jump,
    planted_data,
    planted_monitor,
    read_manifest,
    recorded_layer,
    run_replay,
    run_replay_command,
    spike_monitor,
)
from tests.agent.incident_models import (
    linear,
    named_inputs,
    plain,
    planted_log,
)


@pytest.mark.parametrize(
    "options",
    [{}, {"jit_compile": True, "steps_per_execution": 4}],
    ids=["graph", "xla-steps_per_execution-4"],
)
def test_planted_log_of_zero_is_captured_before_its_update_and_replay_names_the_op(
    tmp_path, options
):
    x, y = planted_data()
    model = planted_log()
    monitor = planted_monitor(tmp_path)

    weights_before = fit_planted(model, monitor, x, y, **options)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD_STEP
    assert manifest["cause"] == "nonfinite"
    assert manifest["batch"]["structure"] == "x,y"
    assert manifest["recorded"][-1]["step"] == BAD_STEP
    assert manifest["recorded"][-1]["global_norm"] == "nan"
    captured_x = bundle_tensor(bundle, "batch", 0)[: BATCH * 4]
    np.testing.assert_array_equal(
        captured_x.reshape(BATCH, 4), x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH]
    )
    if weights_before is not None:  # the weights just before the bad step's update
        for got, expected in zip(bundle_tensors(bundle, "weights"), weights_before, strict=True):
            np.testing.assert_array_equal(got, expected)

    result = run_replay_command(bundle, "tests.agent.incident_models:planted_log")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reproduced: yes" in out
    assert f"first NaN/Inf: op Log in layer {recorded_layer(bundle, 'log')}" in out
    assert "incident_models.py" in out
    assert "return tf.math.log(x)" in out
    hidden = next(
        line for line in out.splitlines() if f"{recorded_layer(bundle, 'hidden')}" in line
    )
    assert "nan" in hidden  # the layer after log: NaN replayed, NaN recorded
    out_row = next(line for line in out.splitlines() if recorded_layer(bundle, "out") in line)
    assert float(out_row.split("│")[6]) > 0  # its largest finite |g|
    assert "global_norm" in out
    assert "by_value" in out
    assert "zclip" in out


def test_replayed_in_the_training_process_it_reports_the_names_training_recorded(tmp_path):
    """In a notebook the rebuilt model gets the next unique name (``sequential_4`` for the
    recorded ``sequential_3``); the replay's Python API reports the recorded names, the ones
    the server shows, for layers with variables and for the log layer, which has none."""
    x, y = planted_data()
    model = planted_log()
    monitor = planted_monitor(tmp_path)
    fit_planted(model, monitor, x, y)
    (bundle,) = monitor.incidents

    report = replay(Path(bundle), "tests.agent.incident_models:planted_log")

    assert [layer.layer for layer in report.layers] == [f"{model.name}/hidden", f"{model.name}/out"]
    assert all(layer.recorded is not None for layer in report.layers)
    assert report.first_bad_op is not None
    assert report.first_bad_op.layer == f"{model.name}/log"


def test_a_nan_in_the_data_is_traced_to_the_first_layer_that_reads_it(tmp_path):
    x, y = planted_data(zero_in_batch=None, nan_in_batch=BAD_STEP)
    model = plain()
    monitor = planted_monitor(tmp_path)
    fit_planted(model, monitor, x, y)

    (bundle,) = monitor.incidents
    result = run_replay(bundle, "tests.agent.incident_models:plain")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout
    assert "the batch itself holds 1 NaN/Inf value(s) in x" in result.stdout
    assert f"first NaN/Inf: op MatMul in layer {recorded_layer(bundle, 'hidden')}" in result.stdout


def test_a_learning_rate_jump_skipped_by_skip_spike_is_captured_and_reproduced(tmp_path):
    """Finite gradients: the bundle is of the first step the policy skipped, and the replay
    gives the recorded global norm back (no op made a NaN/Inf)."""
    x, y = planted_data(zero_in_batch=None)
    monitor = spike_monitor(tmp_path, "lr-jump")
    fit_with_learning_rate_jump(linear(), monitor, x, y)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["cause"] == "skipped"
    assert manifest["step"] == 13  # the step after the jump: its gradient is the spike
    result = run_replay(bundle, "tests.agent.incident_models:linear")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout
    assert "first NaN/Inf: none" in result.stdout
    # The flight recorder kept the rate each update applied: the jump is named.
    rates = {row["step"]: row["learning_rate"] for row in manifest["recorded"]}
    assert rates[11] == pytest.approx(0.01)
    assert rates[12] == rates[13] == 30.0
    assert "30 from step 12 (×3000)" in result.stdout, result.stdout


def test_a_custom_loop_captures_the_batch_it_offers(tmp_path):
    x, y = planted_data()
    model = planted_log()
    monitor = planted_monitor(tmp_path)
    custom_loop(model, monitor, x, y, steps=12)

    (bundle,) = monitor.incidents
    assert read_manifest(bundle)["step"] == BAD_STEP
    result = run_replay(bundle, "tests.agent.incident_models:planted_log")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first NaN/Inf: op Log" in result.stdout


def test_fit_on_data_not_a_multiple_of_the_batch_size_keeps_the_batch_and_replays(tmp_path):
    """The last batch is partial, so Keras traces the step with a dynamic batch dimension:
    the capture's buffer takes the batch's size when it copies it (graph mode)."""
    x, y = planted_data()
    model = planted_log()
    monitor = planted_monitor(tmp_path)
    fit_planted(model, monitor, x[:-5], y[:-5])
    (bundle,) = monitor.incidents

    assert read_manifest(bundle)["batch"] is not None
    np.testing.assert_array_equal(
        bundle_tensor(bundle, "batch", 0).reshape(BATCH, 4),
        x[BAD_STEP * BATCH : (BAD_STEP + 1) * BATCH],
    )
    result = run_replay(bundle, "tests.agent.incident_models:planted_log")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first NaN/Inf: op Log" in result.stdout


def test_under_xla_a_dynamic_batch_shape_is_said_and_the_replay_names_its_position(
    tmp_path, capsys
):
    x, y = planted_data()
    model = planted_log()
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    monitor = planted_monitor(tmp_path)
    fit_planted(model, monitor, x[:-5], y[:-5])
    (bundle,) = monitor.incidents

    said = capsys.readouterr().err
    assert "incident capture keeps no batch under XLA" in said
    assert "its weights and optimizer state (not its batch) are in" in said
    assert read_manifest(bundle)["batch"] is None
    result = run_replay(bundle, "tests.agent.incident_models:planted_log")
    assert result.returncode == 2
    assert f"the bad batch is step {BAD_STEP} of epoch 0 of the data" in result.stderr


def test_only_max_incidents_bundles_are_written_and_zero_turns_capture_off(tmp_path):
    x, y = planted_data()
    x[12 * BATCH, 0] = 0.0  # a second bad step
    for limit, expected in ((0, 0), (1, 1), (2, 2)):
        model = planted_log()
        monitor = planted_monitor(tmp_path / str(limit), max_incidents=limit)
        fit_planted(model, monitor, x, y)
        assert len(monitor.incidents) == expected


def test_a_replay_of_a_bundle_with_the_wrong_model_says_so(tmp_path):
    x, y = planted_data()
    model = planted_log()
    monitor = planted_monitor(tmp_path)
    fit_planted(model, monitor, x, y)
    (bundle,) = monitor.incidents

    wrong = run_replay(bundle, "tests.agent.incident_models:wide")
    missing = run_replay(str(tmp_path), "tests.agent.incident_models:plain")

    assert wrong.returncode == 2
    assert "is --model-fn building the same model" in wrong.stderr
    assert missing.returncode == 2
    assert "no readable manifest.json" in missing.stderr


def test_the_recorder_rows_after_the_step_are_announced_as_they_are_read(tmp_path):
    """The announcement carries the rows up to the bad step; the rows after it follow with
    the later batches, each once, until ``recorder_steps`` steps after it."""
    x, y = planted_data()
    monitor = planted_monitor(tmp_path, recorder_steps=3)
    fit_planted(planted_log(), monitor, x, y)

    run_file = read_run_file(tmp_path / "runs" / f"{monitor.run_id}.jsonl")
    items = [item for batch in run_file.batches for item in batch.get("incidents", ())]
    first, *following = items
    assert first["recorded"]["step"] == [BAD_STEP - 2, BAD_STEP - 1, BAD_STEP]
    assert following, "no rows after the bad step were announced"
    after = [step for item in following for step in item["recorded"]["step"]]
    assert after == [BAD_STEP + 1, BAD_STEP + 2, BAD_STEP + 3]
    # The same announcement each time, with other rows; positions too (one epoch).
    assert all({**item, "recorded": None} == {**first, "recorded": None} for item in following)
    steps_in_epoch = [s for item in following for s in item["recorded"]["step_in_epoch"]]
    assert steps_in_epoch == after
    rates = [lr for item in following for lr in item["recorded"]["learning_rate"]]
    assert rates == pytest.approx([0.01] * 3)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_incidents", -1),
        ("incident_max_bytes", 0),
        ("recorder_steps", 0),
        ("recorder_steps", 2049),
        ("incident_on_explosion", "yes"),
    ],
)
def test_incident_settings_are_checked_at_construction(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        GradientMonitor(run="x", local_dir=str(tmp_path), **{name: value})


def test_a_model_fed_a_dict_of_named_inputs_gets_its_dict_back_in_the_replay(tmp_path):
    """The bundle keeps how the batch nests (``({"a": ..., "b": ...}, y)``), so the replay
    feeds the functional model its named inputs and names the planted op."""
    x, y = planted_data()
    b = np.random.default_rng(1).normal(size=(len(x), 2)).astype("float32")
    b[BAD_STEP * BATCH + 1, 1] = np.inf  # a second bad input: named by its key
    model = named_inputs()
    monitor = planted_monitor(tmp_path)
    model.fit(
        {"a": x, "b": b}, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        callbacks=[monitor],
    )  # fmt: skip
    monitor.close()

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["batch"]["nest"] == {"tuple": [{"dict": {"a": 0, "b": 1}}, 2]}
    result = run_replay(bundle, "tests.agent.incident_models:named_inputs")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout, result.stdout
    assert "the batch itself holds 1 NaN/Inf value(s) in x[b]" in result.stdout, result.stdout
    assert "first NaN/Inf: op Log in layer" in result.stdout, result.stdout
