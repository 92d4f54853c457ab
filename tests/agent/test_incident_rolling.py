"""Rolling capture under XLA (``incident_snapshot_every``): a copy of the state every K steps
and the batches since, rolled forward by ``gradwatch replay`` to the bad step.

A real ``fit(jit_compile=True)`` of a model with a ``Dropout`` (its masks come from the RNG
state the copy holds), a NaN planted in the data of step 13: the bundle holds the weights as
step 8 began (checked against the weights a callback saw), the batches of steps 8–13, and the
replay runs steps 8–12 again with the recorded global norms and names the bad input. With a
clipping chain holding state (ZClip's EMA) the replay rebuilds it from its description and restores
its state from the copy, or the rolled steps would clip differently from training.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradwatch.agent import ConfigError, GradientMonitor, clip
from gradwatch.agent.clip.described import from_description
from gradwatch.agent.replay_bundle import BundleError, open_bundle
from gradwatch.agent.replay_roll import roll_forward
from tests.agent.incident_helpers import (
    BATCH,
    bundle_tensor,
    bundle_tensors,
    planted_data,
    read_manifest,
    recorded_layer,
    run_replay,
)
from tests.agent.incident_models import dropout

BAD = 13
EVERY = 8


def _fit(tmp_path, steps_per_execution: int, **settings):
    x, y = planted_data(zero_in_batch=None, nan_in_batch=BAD)
    model = dropout()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="mse",
        jit_compile=True,
        steps_per_execution=steps_per_execution,
    )
    monitor = GradientMonitor(
        run="rolling", flush_every=4, local_dir=str(tmp_path / "runs"), **settings
    )
    began: dict[int, list[np.ndarray]] = {}

    class KeepWeights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            began[batch] = [np.array(w.numpy()) for w in self.model.trainable_weights]

    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        callbacks=[KeepWeights(), monitor],
    )  # fmt: skip
    monitor.close()
    return monitor, x, began


def _zclip_after_skip():
    return clip.chain(
        clip.skip_nonfinite(), clip.zclip(warmup_steps=4, z_threshold=1.0), clip.global_norm(0.5)
    )


@pytest.mark.parametrize(
    ("steps_per_execution", "policy"),
    [(1, None), (4, None), (1, _zclip_after_skip())],
    ids=["no-policy", "steps_per_execution-4", "zclip"],
)
def test_xla_bundle_holds_a_copy_from_before_the_step_and_replay_rolls_forward(
    tmp_path, steps_per_execution, policy
):
    monitor, x, began = _fit(
        tmp_path, steps_per_execution, incident_snapshot_every=EVERY, policy=policy
    )

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["step"] == BAD
    assert manifest["jit_compile"] is True
    assert manifest["format"] == "gradwatch-incident/2"  # a /1 reader would not roll forward
    rolled = manifest["roll_forward"]
    assert {k: rolled[k] for k in ("from_step", "steps", "every", "missing")} == {
        "from_step": 8, "steps": 5, "every": EVERY, "missing": []
    }  # fmt: skip
    if policy is not None:  # ZClip's EMA as step 8 began; the steps since were clipped
        assert [s["path"] for s in rolled["policy_state"]] != []
        records = read_manifest(bundle)["recorded"]
        assert any(r["clip_coef"] < 1 for r in records if r["step"] < BAD)
    # The weights as step 8 began (with steps_per_execution=4, step 8 begins an execution).
    for got, expected in zip(bundle_tensors(bundle, "weights"), began[8], strict=True):
        np.testing.assert_array_equal(got, np.asarray(expected))
    for j, step in enumerate(range(8, BAD + 1)):
        kind = "batch" if step == BAD else f"earlier/{j}/batch"
        kept = bundle_tensor(bundle, kind, 0)[: BATCH * 4].reshape(BATCH, 4)
        np.testing.assert_array_equal(kept, x[step * BATCH : (step + 1) * BATCH])

    if steps_per_execution > 1:
        return  # the same bundle as with 1 (its replay does not depend on how it was trained)
    result = run_replay(bundle, "tests.agent.incident_models:dropout")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reproduced: yes" in out
    # Steps 8-12 ran again with their dropout masks: the norms training recorded.
    assert "rolled forward 5 steps from step 8" in out, out
    assert "their global norms equal the recorded ones" in out, out
    assert "the batch itself holds 1 NaN/Inf value(s) in x" in out
    assert f"first NaN/Inf: op MatMul in layer {recorded_layer(bundle, 'wide')}" in out


def test_snapshot_every_1_copies_the_bad_steps_own_state_under_xla(tmp_path):
    monitor, _, began = _fit(tmp_path, 1, incident_snapshot_every=1)

    (bundle,) = monitor.incidents
    manifest = read_manifest(bundle)
    assert manifest["roll_forward"] is None
    for got, expected in zip(bundle_tensors(bundle, "weights"), began[BAD], strict=True):
        np.testing.assert_array_equal(got, np.asarray(expected))


@pytest.mark.parametrize("value", [0, -3, 1025, 2.5, "8"])
def test_incident_snapshot_every_out_of_range_is_refused_naming_it(tmp_path, value):
    with pytest.raises(ConfigError, match="incident_snapshot_every"):
        GradientMonitor(run="bad", local_dir=str(tmp_path), incident_snapshot_every=value)


def test_a_bundle_missing_batches_between_its_copy_and_the_step_says_it_cannot_roll():
    manifest = {
        "step": 40,
        "roll_forward": {"from_step": 32, "steps": 5, "every": 8, "missing": [35, 36, 37]},
    }
    with pytest.raises(BundleError, match="the batches of steps 35–37 were not kept"):
        roll_forward(None, manifest, None)


@pytest.mark.parametrize(
    "policy",
    [
        clip.by_value(2.0),
        clip.by_norm(1.5),
        clip.global_norm(1.0),
        clip.layer_norm(1.0, {"dense*": 2.0}),
        clip.agc(0.02, 1e-3),
        clip.autoclip(20, 500, 10),
        clip.zclip(0.9, 3.0, 10, 1e-6),
        clip.skip_nonfinite(3),
        clip.skip_nonfinite(),
        clip.skip_spike(5.0, 64, 32),
        clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0)),
    ],
    ids=lambda p: p.name,
)
def test_a_policy_is_rebuilt_equal_from_its_description(policy):
    assert from_description(policy.describe()) == policy


def test_an_unknown_policy_description_is_refused_naming_it():
    with pytest.raises(ConfigError, match="unknown policy 'clip_everything'"):
        from_description({"policy": "clip_everything"})
    with pytest.raises(ConfigError, match="policy global_norm"):
        from_description({"policy": "global_norm", "limit": 1.0})


def test_a_ring_over_incident_max_bytes_falls_back_to_the_exact_copy_and_says_so(tmp_path, capsys):
    """The state (1,176 bytes: the weights and Adam's) fits the cap; 8 batches of 320 bytes
    (16×4 x, 16×1 y, float32) more do not: the capture copies before the bad step's update
    and says why."""
    monitor, _, began = _fit(tmp_path, 1, incident_snapshot_every=EVERY, incident_max_bytes=2_000)

    assert "incident capture under XLA copies the state before every step" in (
        capsys.readouterr().err
    )
    (bundle,) = monitor.incidents
    assert read_manifest(bundle)["roll_forward"] is None
    for got, expected in zip(bundle_tensors(bundle, "weights"), began[BAD], strict=True):
        np.testing.assert_array_equal(got, np.asarray(expected))


def test_a_bundle_of_an_unknown_format_is_refused_naming_the_formats_read(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "gradwatch-incident/9"}')
    with pytest.raises(BundleError, match="'gradwatch-incident/1' and 'gradwatch-incident/2'"):
        open_bundle(tmp_path)
