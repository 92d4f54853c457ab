"""Every clip policy through a real ``model.fit``, graph and XLA."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradwatch.agent import GradientMonitor, clip
from tests.agent.conftest import RecordingTransport
from tests.agent.models import regression_data, small_model

STEPS = 6
BATCH = 8


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return regression_data(STEPS * BATCH, seed)


# Small windows and warm-ups so the adaptive policies clip within a few steps.
POLICIES = {
    "by_value": lambda: clip.by_value(0.05),
    "by_norm": lambda: clip.by_norm(0.1),
    "global_norm": lambda: clip.global_norm(0.1),
    "layer_norm": lambda: clip.layer_norm(0.1, {"net/out": 0.05}),
    "agc": lambda: clip.agc(0.01),
    "autoclip": lambda: clip.autoclip(percentile=50, history=4, warmup_steps=2),
    "zclip": lambda: clip.zclip(warmup_steps=2, z_threshold=0.5),
    "skip_nonfinite": lambda: clip.skip_nonfinite(max_consecutive=2),
    "skip_spike": lambda: clip.skip_spike(sigma=1.0, window=4, min_history=2),
    "chain": lambda: clip.chain(clip.skip_nonfinite(), clip.zclip(warmup_steps=2), clip.agc()),
}


def _fit(policy, transport, jit: bool):
    x, y = _data()
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
    monitor = GradientMonitor(run="clip", transport=transport, policy=policy, flush_every=4)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[monitor]
    )
    assert monitor.close(timeout_seconds=10)
    return model, history


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_fit_with_and_without_xla_records_every_step_and_agrees(name):
    runs = {}
    for jit in (False, True):
        transport = RecordingTransport()
        model, history = _fit(POLICIES[name](), transport, jit)
        assert transport.steps() == list(range(STEPS))
        assert all(np.isfinite(w).all() for w in model.get_weights())
        assert np.isfinite(history.history["loss"]).all()
        coef = transport.column("clip_coef")
        assert np.all((coef >= 0) & (coef <= 1))
        before = transport.column("global_norm")
        after = transport.column("global_norm_clipped")
        assert np.all(after <= before * (1 + 1e-5))
        skipped = transport.column("skipped")
        if name != "skip_spike":  # tuned to skip here: sigma=1 over a window of 4
            assert not skipped.any()
        np.testing.assert_array_equal(coef[skipped], 0.0)
        if name != "skip_nonfinite":  # every other policy is tuned to act within these steps
            assert (coef < 1).any()
        assert transport.runs[0].config["policy"]["policy"] == name
        runs[jit] = (model.get_weights(), coef, skipped)
    (graph_weights, graph_coef, graph_skipped), (xla_weights, xla_coef, xla_skipped) = (
        runs[False],
        runs[True],
    )
    np.testing.assert_array_equal(graph_skipped, xla_skipped)
    np.testing.assert_allclose(graph_coef, xla_coef, rtol=1e-4, atol=1e-6)
    for graph, xla in zip(graph_weights, xla_weights, strict=True):
        np.testing.assert_allclose(graph, xla, rtol=1e-4, atol=1e-6)


class _WeightRecorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.copy() for w in self.model.get_weights()])


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_skip_nonfinite_fit_skips_the_nan_batch_and_freezes_weights(transport, jit):
    x, y = _data()
    nan_step = 2
    x[nan_step * BATCH : (nan_step + 1) * BATCH] = np.nan  # every gradient of step 2 is NaN
    model = small_model()
    adam = keras.optimizers.Adam(0.05)
    model.compile(optimizer=adam, loss="mse", jit_compile=jit)
    monitor = GradientMonitor(
        run="skip", transport=transport, policy=clip.skip_nonfinite(), flush_every=4
    )
    recorder = _WeightRecorder()
    model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[monitor, recorder]
    )
    assert monitor.close(timeout_seconds=10)
    assert transport.steps() == list(range(STEPS))
    skipped = transport.column("skipped").tolist()
    assert skipped == [i == nan_step for i in range(STEPS)]
    for got, want in zip(recorder.weights[nan_step], recorder.weights[nan_step - 1], strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(recorder.weights[nan_step + 1], recorder.weights[nan_step], strict=True):
        assert not np.array_equal(got, want)  # training resumes
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert int(adam.iterations.numpy()) == STEPS - 1  # Adam's state was frozen too
    assert transport.column("clip_coef")[nan_step] == 0.0
    assert transport.column("global_norm_clipped")[nan_step] == 0.0
    assert np.isnan(transport.column("global_norm")[nan_step])
