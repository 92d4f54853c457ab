"""An incident bundle written during a real ``fit`` reaches a real server with the next batch,
and the recorder's rows after its step with the batches after it: ``/incidents``, the
run-level nonfinite event, ``/health`` and ``gradwatch show`` point at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradwatch.agent import GradientMonitor, clip
from tests.agent.incident_models import planted_log

pytestmark = pytest.mark.e2e

BAD_STEP, BATCH = 7, 16
_SCRIPT = Path(sys.executable).with_name("gradwatch")
GRADWATCH = str(_SCRIPT) if _SCRIPT.exists() else shutil.which("gradwatch") or "gradwatch"


def test_bundle_of_a_planted_log_zero_is_announced_to_the_server(server, api, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(12 * BATCH, 4)).astype("float32")
    y = rng.normal(size=(12 * BATCH, 1)).astype("float32")
    x[BAD_STEP * BATCH + 3, 2] = 0.0  # log(0) in step 7's forward pass
    model = planted_log()
    with GradientMonitor(
        run="announced",
        server=server.url,
        policy=clip.chain(clip.skip_nonfinite(), clip.global_norm(1.0)),
        flush_every=4,
        incident_dir=str(tmp_path / "incidents"),
    ) as monitor:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        assert monitor.flush(timeout_seconds=30)
    (bundle,) = monitor.incidents
    run_id = monitor.run_id

    [incident] = api.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert incident["step"] == BAD_STEP
    assert incident["cause"] == "nonfinite"
    assert incident["path"] == str(Path(bundle).resolve())
    assert incident["host"] == socket.gethostname()
    on_disk = sum(p.stat().st_size for p in Path(bundle).glob("state*"))
    assert incident["bytes"] == on_disk > 0
    assert incident["learning_rate"] == pytest.approx(0.01)
    assert incident["loss_scale"] is None
    # The recorder's rows up to the bad step came with the announcement, those after it
    # (steps 8-11, read at later flushes) were announced again and merged by step.
    assert incident["recorded"]["step"] == list(range(12))
    assert incident["recorded"]["step_in_epoch"] == list(range(12))
    assert incident["recorded"]["epoch"] == [0] * 12
    assert incident["learning_rate_history"] == "learning rate: 0.01 at steps 0–11"
    assert incident["replay"] == f"gradwatch replay {incident['path']}"

    events = api.get(f"/api/v1/runs/{run_id}/events", params={"rule": "nonfinite"}).json()
    [run_level] = [e for e in events["events"] if e["layer"] is None]
    assert run_level["first_step"] == BAD_STEP
    assert run_level["incidents"] == [incident]
    # The onset names the planted layer: the first (and only) one with NaN gradients.
    onset = run_level["onset"]
    assert onset["first_nonfinite_backward"] == onset["first_nonfinite_forward"]
    assert onset["first_nonfinite_backward"] == "sequential/hidden"
    assert api.get(f"/api/v1/runs/{run_id}/health").json()["incidents"] == [incident]

    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    shown = subprocess.run(
        [GRADWATCH, "show", run_id, "--server", server.url, "--width", "40"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "400"},
        check=True,
    ).stdout
    assert f"incident bundle: step {BAD_STEP} (non-finite gradient)" in shown
    assert incident["replay"] in shown
    assert "around it: learning rate: 0.01 at steps 0–11" in shown
