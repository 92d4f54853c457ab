"""Delivery faults against a real server on 127.0.0.1: outages, errors, kills, the spool cap.

Servers that must stop, restart or die run as ``gradwatch server`` subprocesses on the
same SQLite file (:class:`ServerProcess`); the others run in-process. Every fault is
injected at a fixed training step and every wait is bounded, so each test stops by itself.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import keras
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from gradwatch.agent import GradientMonitor, clip
from gradwatch.agent.records import OutgoingBatch, as_wire
from gradwatch.agent.sender import DropReason
from gradwatch.agent.transport import HttpTransport
from gradwatch.server import embedded
from gradwatch.server.cli import app as cli_app
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from tests.fakes import BlockingTransport
from tests.server_process import WAIT_SECONDS, ServerProcess, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BATCH, SAMPLES = 16, 80  # 5 steps per epoch
LAYERS = ("delivery/dense_in", "delivery/dense_mid", "delivery/dense_out")


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def server_process(tmp_path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "gradwatch.db")
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture
def monitors() -> Iterator[list[GradientMonitor]]:
    """Monitors a test makes; each is closed at the end whatever happened."""
    made: list[GradientMonitor] = []
    yield made
    for monitor in made:
        monitor.close(timeout_seconds=1)


def _model() -> keras.Model:
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(12, activation="relu", name="dense_in"),
            keras.layers.Dense(6, activation="tanh", name="dense_mid"),
            keras.layers.Dense(1, name="dense_out"),
        ],
        name="delivery",
    )


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(SAMPLES, 5)).astype("float32")
    return x, np.sin(x.sum(axis=1, keepdims=True)).astype("float32")


def _fit(monitor: GradientMonitor, epochs: int, *callbacks: keras.callbacks.Callback) -> None:
    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[monitor, *callbacks],
    )


class AtStep(keras.callbacks.Callback):
    """Runs ``actions[step]()`` after that training step (counted across epochs)."""

    def __init__(self, actions: dict[int, Callable[[], None]]) -> None:
        super().__init__()
        self.actions = actions
        self.step = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        action = self.actions.get(self.step)
        self.step += 1
        if action is not None:
            action()


def _series(url: str, run_id: str, metric: str, layer: str | None = None) -> list[int]:
    params = {"metric": metric}
    if layer is not None:
        params["layer"] = layer
    reply = httpx.get(f"{url}/api/v1/runs/{run_id}/series", params=params, timeout=10)
    reply.raise_for_status()
    return list(reply.json()["step"])


def _assert_every_step_once(url: str, run_id: str, steps: int) -> None:
    """Every step of every layer is stored, each exactly once."""
    run = httpx.get(f"{url}/api/v1/runs/{run_id}", timeout=10).json()
    assert run["num_steps"] == steps
    assert _series(url, run_id, "global_norm") == list(range(steps))
    for layer in LAYERS:
        assert _series(url, run_id, "grad_norm", layer) == list(range(steps)), layer
        assert _series(url, run_id, "nonfinite", layer) == list(range(steps)), layer


def _agent_drops(url: str, run_id: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gradwatch_agent_dropped_batches"
        for sample in family.samples
        if sample.labels.get("run_id") == run_id
    }


# -- never block training ------------------------------------------------------------------


def test_fit_completes_when_the_transport_blocks_forever(monitors):
    transport = BlockingTransport()
    monitor = GradientMonitor(run="blocked", transport=transport, flush_every=3)
    monitors.append(monitor)
    try:
        _fit(monitor, epochs=4)  # 20 steps
        assert monitor.sender.accepted_steps == 20  # every step was handed to the sender
        assert monitor.dropped_batches == {}
        assert not monitor.close(timeout_seconds=0.05)  # closes within its timeout anyway
    finally:
        transport.release.set()


# -- outages -------------------------------------------------------------------------------


def test_server_stopped_mid_fit_and_restarted_stores_every_step_once(
    server_process, tmp_path, monitors
):
    server_process.start()
    monitor = GradientMonitor(
        run="outage",
        server=server_process.url,
        flush_every=4,
        retry_deadline_seconds=2.0,
        spool_dir=str(tmp_path / "spool"),
    )
    monitors.append(monitor)

    def restart() -> None:
        # The server stays down until the agent has given up on a batch and spooled it.
        assert monitor.sender.wait_for(lambda: monitor.sender.spooled_total > 0, WAIT_SECONDS)
        server_process.start()

    _fit(monitor, 8, AtStep({9: server_process.stop, 30: restart}))  # 40 steps
    assert monitor.flush(timeout_seconds=WAIT_SECONDS)
    assert monitor.close(timeout_seconds=WAIT_SECONDS)
    assert monitor.dropped_batches == {}
    assert monitor.sender.spooled_total > 0
    _assert_every_step_once(server_process.url, monitor.run_id, 40)
    run = httpx.get(f"{server_process.url}/api/v1/runs/{monitor.run_id}").json()
    assert run["status"] == "finished"
    assert not (tmp_path / "spool" / monitor.run_id).exists()  # drained and removed


def test_server_killed_mid_ingest_then_restarted_duplicates_and_loses_nothing(
    server_process, tmp_path, monitors
):
    server_process.start()
    posting: dict[int, threading.Event] = {}

    class Announcing(HttpTransport):
        """Tells the test when the POST of a batch starts."""

        def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
            posting.setdefault(as_wire(batch)["step"][0], threading.Event()).set()
            super().send_batch(run_id, batch)

    monitor = GradientMonitor(
        run="sigkill",
        server=server_process.url,
        flush_every=4,
        retry_deadline_seconds=1.0,
        spool_dir=str(tmp_path / "spool"),
        transport=Announcing(server_process.url),
    )
    monitors.append(monitor)

    def kill_while_ingesting() -> None:
        started = posting.setdefault(8, threading.Event())
        assert started.wait(WAIT_SECONDS)  # the batch of steps 8..11 is on its way
        server_process.stop(signal.SIGKILL)

    def restart() -> None:
        assert monitor.sender.wait_for(lambda: monitor.sender.spooled_total > 0, WAIT_SECONDS)
        server_process.start()

    _fit(monitor, 6, AtStep({11: kill_while_ingesting, 24: restart}))  # 30 steps
    assert monitor.close(timeout_seconds=WAIT_SECONDS)
    assert monitor.dropped_batches == {}
    _assert_every_step_once(server_process.url, monitor.run_id, 30)


# -- transient errors ----------------------------------------------------------------------


class InjectFaults:
    """ASGI middleware: answers the first batch POSTs with scripted errors; logs arrivals."""

    def __init__(self, app: Any, script: list[tuple[int, str | None]]) -> None:
        self.app = app
        self.script = list(script)
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, status answered)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].endswith("/batches")
            and self.script
        ):
            status, retry_after = self.script.pop(0)
            self.arrivals.append((time.monotonic(), status))
            headers = [(b"content-type", b"application/json")]
            if retry_after is not None:
                headers.append((b"retry-after", retry_after.encode()))
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"detail": "injected"}'})
            return
        if scope["type"] == "http" and scope["path"].endswith("/batches"):
            self.arrivals.append((time.monotonic(), 200))
        await self.app(scope, receive, send)


def test_server_answering_503_and_429_loses_nothing_and_waits_as_told(
    tmp_path, monkeypatch, monitors
):
    script = [(503, None), (429, "1"), (503, None), (429, "1")]
    faults: list[InjectFaults] = []

    def create_app(settings: Settings) -> Any:
        faults.append(InjectFaults(real_create_app(settings), script))
        return faults[-1]

    real_create_app = embedded.create_app
    monkeypatch.setattr(embedded, "create_app", create_app)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'gradwatch.db'}")
    with EmbeddedServer(settings) as server:
        monitor = GradientMonitor(
            run="flaky", server=server.url, flush_every=5, spool_dir=str(tmp_path / "spool")
        )
        monitors.append(monitor)
        _fit(monitor, 4)  # 20 steps, 4 batches
        assert monitor.close(timeout_seconds=WAIT_SECONDS)
        _assert_every_step_once(server.url, monitor.run_id, 20)
    assert monitor.dropped_batches == {}
    assert monitor.sender.spooled_total == 0  # retried within the deadline, never spooled
    arrivals = faults[0].arrivals
    assert [status for _, status in arrivals] == [s for s, _ in script] + [200] * 4
    for (at, status), (next_at, _) in itertools.pairwise(arrivals):
        if status == 429:
            assert next_at - at >= 1.0  # Retry-After: 1 honoured


# -- the spool -----------------------------------------------------------------------------


def test_spool_over_its_cap_drops_exactly_the_oldest_batches_and_the_server_exports_it(
    tmp_path, monitors
):
    server = ServerProcess(tmp_path / "gradwatch.db")  # not started: the server is down
    monitor = GradientMonitor(
        run="cap",
        server=server.url,
        flush_every=2,
        retry_deadline_seconds=0.2,
        spool_dir=str(tmp_path / "spool"),
        spool_max_bytes=4000,
    )
    monitors.append(monitor)
    try:
        _fit(monitor, 8)  # 40 steps, 20 batches of 2
        sender = monitor.sender
        assert sender.wait_for(lambda: sender.idle, WAIT_SECONDS)  # all in the spool
        dropped = monitor.dropped_batches.get(DropReason.SPOOL_FULL, 0)
        assert 0 < dropped < 20
        assert monitor.dropped_batches == {DropReason.SPOOL_FULL: dropped}
        server.start()
        # Everything kept was delivered, but batches were dropped: close() says so.
        assert monitor.close(timeout_seconds=WAIT_SECONDS) is False
        assert monitor.sender.spooled_batches == 0
        stored = _series(server.url, monitor.run_id, "global_norm")
        assert stored == list(range(2 * dropped, 40))  # exactly the oldest batches are gone
        assert _agent_drops(server.url, monitor.run_id) == {DropReason.SPOOL_FULL: dropped}
    finally:
        server.stop(signal.SIGKILL)


def test_a_new_monitor_for_the_same_run_sends_what_the_last_one_left(tmp_path, monitors):
    server = ServerProcess(tmp_path / "gradwatch.db")  # down while the first monitor trains
    spool_dir = str(tmp_path / "spool")
    first = GradientMonitor(
        run="restart",
        server=server.url,
        flush_every=4,
        retry_deadline_seconds=0.2,
        spool_dir=spool_dir,
    )
    monitors.append(first)
    try:
        _fit(first, 2)  # 10 steps
        assert not first.close(timeout_seconds=0.5)
        assert len(list((tmp_path / "spool" / first.run_id).glob("*.json.gz"))) == 3
        server.start()
        second = GradientMonitor(
            run="restart", server=server.url, run_id=first.run_id, spool_dir=spool_dir
        )
        monitors.append(second)
        assert second.flush(timeout_seconds=WAIT_SECONDS)
        assert second.close()
        _assert_every_step_once(server.url, first.run_id, 10)
        run = httpx.get(f"{server.url}/api/v1/runs/{first.run_id}").json()
        assert run["status"] == "finished"
    finally:
        server.stop(signal.SIGKILL)


# -- run status ----------------------------------------------------------------------------


def test_an_exception_in_fit_marks_the_run_failed(server, monitors):
    def boom() -> None:
        raise RuntimeError("boom")

    monitor = GradientMonitor(run="boom", server=server.url, flush_every=4)
    monitors.append(monitor)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(monitor, 2, AtStep({6: boom}))
    assert monitor.close()  # status: failed, since fit began and never ended
    run = httpx.get(f"{server.url}/api/v1/runs/{monitor.run_id}").json()
    assert run["status"] == "failed"
    assert run["num_steps"] == 7  # steps 0..6, read at close


def test_monitors_left_open_are_closed_at_interpreter_exit_with_their_status(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import keras, numpy as np
        from gradwatch.agent import GradientMonitor

        def fit(monitor, fail):
            keras.utils.set_random_seed(1)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="d")])
            model.compile(optimizer="sgd", loss="mse")

            class Boom(keras.callbacks.Callback):
                def on_train_batch_end(self, batch, logs=None):
                    if fail and batch == 2:
                        raise RuntimeError("boom")

            x, y = np.ones((40, 3), "float32"), np.ones((40, 1), "float32")
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor, Boom()])

        ok = GradientMonitor(run="ok", local_dir=sys.argv[1], flush_every=100)
        fit(ok, fail=False)
        failed = GradientMonitor(run="failed", local_dir=sys.argv[1], flush_every=100)
        try:
            fit(failed, fail=True)
        except RuntimeError:
            pass
        print("RUN_IDS", ok.run_id, failed.run_id)
        # No close(): the interpreter exits with both monitors open.

        import gc, weakref
        transient = GradientMonitor(run="transient", local_dir=sys.argv[1])
        reference = weakref.ref(transient)
        del transient
        gc.collect()
        print("COLLECTED", reference() is None)  # registered for exit, yet collectable
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a safety bound; it takes a few seconds
    )
    assert result.returncode == 0, result.stderr
    assert "COLLECTED True" in result.stdout
    ids = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RUN_IDS")]
    ok_id, failed_id = ids[0]

    def records(run_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / f"{run_id}.jsonl").open()]

    ok, failed = records(ok_id), records(failed_id)
    assert [r["status"] for r in ok if r["kind"] == "status"][-1] == "finished"
    assert [r["status"] for r in failed if r["kind"] == "status"][-1] == "failed"
    assert [s for r in ok if r["kind"] == "batch" for s in r["batch"]["step"]] == list(range(5))
    assert [s for r in failed if r["kind"] == "batch" for s in r["batch"]["step"]] == [0, 1, 2]


# -- local mode and upload -----------------------------------------------------------------


def test_local_mode_writes_jsonl_and_prints_a_summary_at_the_end_of_training(
    tmp_path, capsys, monitors
):
    monitor = GradientMonitor(
        run="offline", local_dir=str(tmp_path), flush_every=4, policy=clip.global_norm(0.01)
    )
    monitors.append(monitor)
    _fit(monitor, 2)  # 10 steps
    out = capsys.readouterr().out
    path = tmp_path / f"{monitor.run_id}.jsonl"
    records = [json.loads(line) for line in path.open()]
    batches = [r["batch"] for r in records if r["kind"] == "batch"]
    assert [s for b in batches for s in b["step"]] == list(range(10))
    max_norm = max(v for b in batches for v in b["global_norm"])
    assert f"run 'offline': 10 steps, max global norm {max_norm:.4g}, 10 clipped" in out
    assert "0 skipped, 0 non-finite" in out
    assert str(path) in out
    assert "gradwatch upload" in out
    monitor.close()
    assert capsys.readouterr().out == ""  # nothing new since the summary: not printed again


def _upload(path: Path, url: str) -> str:
    result = CliRunner().invoke(cli_app, ["upload", str(path), "--server", url])
    assert result.exit_code == 0, result.output
    return result.output


def test_upload_of_a_local_run_is_idempotent(server, tmp_path, monitors):
    monitor = GradientMonitor(run="later", local_dir=str(tmp_path / "runs"), flush_every=4)
    monitors.append(monitor)
    _fit(monitor, 2)
    monitor.close()
    path = tmp_path / "runs" / f"{monitor.run_id}.jsonl"
    first = _upload(path, server.url)
    assert "3 batches, 3 stored, 0 already stored, 0 failed; status finished" in first
    _assert_every_step_once(server.url, monitor.run_id, 10)
    second = _upload(tmp_path / "runs", server.url)  # the directory works too
    assert "3 batches, 0 stored, 3 already stored, 0 failed" in second
    _assert_every_step_once(server.url, monitor.run_id, 10)
    run = httpx.get(f"{server.url}/api/v1/runs/{monitor.run_id}").json()
    assert (run["name"], run["status"]) == ("later", "finished")


def test_upload_of_a_leftover_spool_is_idempotent(server, tmp_path, monitors):
    down = f"http://127.0.0.1:{free_port()}"
    monitor = GradientMonitor(
        run="leftover",
        server=down,
        flush_every=4,
        retry_deadline_seconds=0.2,
        spool_dir=str(tmp_path / "spool"),
    )
    monitors.append(monitor)
    _fit(monitor, 2)
    assert not monitor.close(timeout_seconds=0.5)
    first = _upload(tmp_path / "spool", server.url)
    assert "3 batches, 3 stored, 0 already stored, 0 failed; status finished" in first
    second = _upload(tmp_path / "spool" / monitor.run_id, server.url)
    assert "3 batches, 0 stored, 3 already stored, 0 failed" in second
    _assert_every_step_once(server.url, monitor.run_id, 10)


def test_upload_rejects_a_malformed_server_url(tmp_path):
    result = CliRunner().invoke(cli_app, ["upload", str(tmp_path), "--server", "localhost:1"])
    assert result.exit_code == 2
    assert "server:" in result.output


# -- fork ----------------------------------------------------------------------------------


def test_sender_in_a_forked_child_uses_its_own_connections(server):
    script = textwrap.dedent(
        """
        import os, sys
        from gradwatch.agent.sender import Sender
        from gradwatch.agent.transport import HttpTransport, RunInfo
        from tests.fakes import step_batch as batch

        run = RunInfo("00000000-0000-4000-8000-0000000000f0", "fork", "p")
        sender = Sender(HttpTransport(sys.argv[1]), run)
        sender.submit(batch(0))
        assert sender.flush(30)  # the parent's connection is open and pooled now
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code = 0 if sender.submit(batch(1)) and sender.close(30) else 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        sender.submit(batch(2))
        assert sender.close(30)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, server.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run_id = "00000000-0000-4000-8000-0000000000f0"
    assert _series(server.url, run_id, "global_norm") == [0, 1, 2]
