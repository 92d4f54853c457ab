"""``MultiWorkerMirroredStrategy`` with two real worker processes on 127.0.0.1 gives one run,
every step once, and the single-process norms, clipping and weights; a bad step on one
worker is captured once, by the chief, with the global batch.

Each process runs ``tests/agent/multiworker_job.py`` (the README's custom loop) with
``TF_CONFIG`` naming a two-worker cluster on free loopback ports; the reference is the same
script in one process without ``TF_CONFIG``. They stream to one real server on 127.0.0.1.
Keras 3's own ``fit`` cannot run under this strategy (keras-team/keras#20585), so the custom
loop is the supported path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gradwatch.agent import ConfigError
from gradwatch.agent.cluster import cluster_task, shared_run_id
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.wire import decode_float
from tests.agent.incident_helpers import bundle_tensor, read_manifest, run_replay_command
from tests.agent.multiworker_job import global_batch
from tests.server_process import free_port

pytestmark = pytest.mark.e2e

JOB = Path(__file__).with_name("multiworker_job.py")
STEPS = 12
TIMEOUT_SECONDS = 240.0
LAYERS = ("sequential/hidden", "sequential/out")
METRICS = ("global_norm", "global_norm_clipped", "clip_coef", "loss")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[EmbeddedServer]:
    database = tmp_path_factory.mktemp("server") / "gradwatch.db"
    with EmbeddedServer(Settings(database_url=f"sqlite:///{database}")) as running:
        yield running


@pytest.fixture(scope="module")
def api(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


def _env(tf_config: dict[str, object] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH_", "TF_CONFIG"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(JOB.parents[2]), env.get("PYTHONPATH")]))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _launch(
    out: Path, server: EmbeddedServer, addresses: list[str] | None, *args: str
) -> list[subprocess.CompletedProcess[str]]:
    """Run the job: one process per address (a cluster), or one without ``TF_CONFIG``."""
    out.mkdir(exist_ok=True)
    command = [sys.executable, str(JOB), "--out", str(out), "--server", server.url, *args]
    configs: list[dict[str, object] | None] = (
        [None]
        if addresses is None
        else [
            {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            for index in range(len(addresses))
        ]
    )
    processes = [
        subprocess.Popen(
            command,
            env=_env(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for config in configs
    ]
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=TIMEOUT_SECONDS)
            results.append(subprocess.CompletedProcess(command, process.returncode, output, ""))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _result(out: Path, index: int) -> dict[str, object]:
    return json.loads((out / f"result-{index}.json").read_text())  # type: ignore[no-any-return]


def _weights(out: Path, index: int) -> list[np.ndarray]:
    with np.load(out / f"weights-{index}.npz") as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def _series(api: httpx.Client, run_id: str, metric: str, layer: str | None = None) -> dict:
    params: dict[str, object] = {"metric": metric, "raw": "true", "max_points": 1000}
    if layer is not None:
        params["layer"] = layer
    response = api.get(f"/api/v1/runs/{run_id}/series", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    return {"step": body["step"], "value": [decode_float(v) for v in body["value"]]}


def _recorded(api: httpx.Client, run_id: str) -> dict[str, dict]:
    """Every step-keyed series of a run: run-level metrics and per-layer gradient norms."""
    recorded = {metric: _series(api, run_id, metric) for metric in METRICS}
    for layer in LAYERS:
        recorded[f"grad_norm/{layer}"] = _series(api, run_id, "grad_norm", layer)
        recorded[f"update_ratio/{layer}"] = _series(api, run_id, "update_ratio", layer)
    return recorded


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("reference")
    (done,) = _launch(out, server, None, "--steps", str(STEPS))
    assert done.returncode == 0, done.stdout
    return out, str(_result(out, 0)["run_id"])


def _assert_same_as_reference(
    api: httpx.Client, run_id: str, out: Path, reference: tuple[Path, str]
) -> None:
    reference_out, reference_run = reference
    expected, got = _recorded(api, reference_run), _recorded(api, run_id)
    assert got["global_norm"]["step"] == list(range(STEPS))  # every step, once, in order
    for name, series in expected.items():
        assert got[name]["step"] == series["step"], name
        np.testing.assert_allclose(got[name]["value"], series["value"], rtol=1e-6, err_msg=name)
    assert min(got["clip_coef"]["value"]) < 1.0  # the policy clipped the planted large step
    for index in (0, 1):
        for mine, theirs in zip(_weights(out, index), _weights(reference_out, 0), strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)


def test_two_workers_report_one_run_with_the_single_process_norms_clipping_and_weights(
    tmp_path, server, api, reference
):
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    chief, worker = _launch(tmp_path, server, addresses, "--steps", str(STEPS))

    assert chief.returncode == 0, chief.stdout
    assert worker.returncode == 0, worker.stdout
    run_id = _result(tmp_path, 0)["run_id"]
    assert _result(tmp_path, 1)["run_id"] == run_id  # derived from TF_CONFIG on each worker
    assert _result(tmp_path, 0)["delivered"]
    assert _result(tmp_path, 1)["delivered"]
    assert "12 steps sent" in chief.stdout
    assert "worker:1 of 2 workers; the chief (worker:0) delivers" in worker.stdout
    assert "steps sent" not in worker.stdout
    runs = api.get("/api/v1/runs", params={"limit": 100}).json()
    names = [item for item in runs["runs"] if item["run_id"] == run_id]
    assert len(names) == 1
    run = api.get(f"/api/v1/runs/{run_id}").json()
    assert run["num_steps"] == STEPS
    assert run["config"]["cluster"] == {"workers": 2, "chief": "worker:0", "delivered_by": "chief"}
    _assert_same_as_reference(api, str(run_id), tmp_path, reference)


def test_a_job_killed_mid_run_and_restarted_from_its_checkpoint_loses_and_repeats_no_step(
    tmp_path, server, api, reference
):
    """Both workers die after step 8 (a worker dying stops a MultiWorkerMirroredStrategy job;
    the job is restarted as a whole), with checkpoints at steps 3 and 6. The restarted job
    restores step 6, the model, the optimizer and the clip policy's state, resends steps 6..7
    (the server keeps the first copy) and ends with the uninterrupted run's numbers."""
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    crashed = _launch(tmp_path, server, addresses, "--steps", str(STEPS), "--crash-after", "8")
    assert [item.returncode for item in crashed] == [3, 3], [item.stdout for item in crashed]

    restarted = _launch(tmp_path, server, addresses, "--steps", str(STEPS))

    for item in restarted:
        assert item.returncode == 0, item.stdout
    run_id = _result(tmp_path, 0)["run_id"]
    assert _result(tmp_path, 1)["run_id"] == run_id
    assert [_result(tmp_path, index)["first_step"] for index in (0, 1)] == [6, 6]
    assert _result(tmp_path, 0)["dropped"] == {}
    run = api.get(f"/api/v1/runs/{run_id}").json()
    assert run["num_steps"] == STEPS
    _assert_same_as_reference(api, str(run_id), tmp_path, reference)


def _tf_config(task_type: str, index: int, **cluster: list[str]) -> dict[str, str]:
    return {
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})
    }


def test_cluster_task_names_the_chief_and_every_worker_derives_the_same_run_id():
    workers = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]
    tasks = [cluster_task(_tf_config("worker", i, worker=workers)) for i in range(3)]

    assert [task.is_chief for task in tasks] == [True, False, False]
    assert {shared_run_id("default", "resnet", task) for task in tasks} == {
        shared_run_id("default", "resnet", tasks[0])
    }
    assert shared_run_id("default", "resnet", tasks[0]) != shared_run_id(
        "default", "resnet-2", tasks[0]
    )
    with_chief = cluster_task(_tf_config("worker", 0, chief=["c:1"], worker=workers))
    assert with_chief.chief == "chief:0"
    assert not with_chief.is_chief
    assert with_chief.workers == 4


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"TF_CONFIG": ""},
        _tf_config("worker", 0, worker=["127.0.0.1:1"]),  # one worker: not a cluster
        _tf_config("evaluator", 0, worker=["a:1", "b:1"]),  # does not train
    ],
)
def test_cluster_task_is_none_outside_a_multi_worker_training_task(environ):
    assert cluster_task(environ) is None


def test_malformed_tf_config_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="TF_CONFIG: expected JSON"):
        cluster_task({"TF_CONFIG": "{not json"})


def test_a_nan_on_one_worker_is_captured_once_by_the_chief_with_the_global_batch(
    tmp_path, server, api
):
    """Step 4's NaN is in worker 1's half of the batch. Both workers take the capture
    branch (an all-gather of the shards); the chief writes the bundle, worker 1 none."""
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    chief, worker = _launch(tmp_path, server, addresses, "--steps", "8", "--nan-at", "4")
    assert chief.returncode == 0, chief.stdout
    assert worker.returncode == 0, worker.stdout
    (bundle,) = _result(tmp_path, 0)["incidents"]
    assert _result(tmp_path, 1)["incidents"] == []
    assert not (tmp_path / "incidents-1").exists()
    manifest = read_manifest(bundle)
    assert (manifest["step"], manifest["cause"], manifest["replicas"]) == (4, "nonfinite", 2)
    x, y = global_batch(4, nan_at=4)
    np.testing.assert_array_equal(bundle_tensor(bundle, "batch", 0).reshape(x.shape), x)
    np.testing.assert_array_equal(bundle_tensor(bundle, "batch", 1).reshape(y.shape), y)
    run_id = _result(tmp_path, 0)["run_id"]
    [announced] = api.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert announced["path"] == str(Path(bundle).resolve())

    result = run_replay_command(bundle, "tests.agent.multiworker_job:build_model")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: yes" in result.stdout
    assert "captured on 2 replicas" in result.stdout
    assert "the batch itself holds 1 NaN/Inf value(s) in x" in result.stdout
