"""A monitor that records nothing, or cannot deliver, says so at once and keeps the data."""

from __future__ import annotations

import logging
import socket
import time

import keras
import numpy as np
import pytest

from gradwatch.agent import ConfigError, GradientMonitor, MonitorClosedError
from gradwatch.agent.spool import Spool
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "gradwatch.db"
    with EmbeddedServer(Settings(database_url=f"sqlite:///{db}")) as running:
        yield running


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)], name="tiny")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _data(n: int = 40):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32)


def test_an_api_path_in_server_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"^server: expected the server's base URL, without"):
        GradientMonitor("x", server="http://127.0.0.1:8765/api/v1")


def test_a_wrong_server_path_says_so_keeps_every_batch_and_close_is_false(
    server, tmp_path, caplog, capsys
):
    x, y = _data()
    monitor = GradientMonitor(
        "wrong-path", server=f"{server.url}/gradwatch", spool_dir=tmp_path, flush_every=1
    )
    with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
        _model().fit(x, y, batch_size=2, verbose=0, callbacks=[monitor])  # 20 batches
        assert monitor.close(timeout_seconds=2) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert f"POST {server.url}/gradwatch/api/v1/runs: HTTP 404" in errors[0]
    assert "refused to create run" in errors[0]
    assert "rejected" not in monitor.dropped_batches
    spool = Spool(tmp_path, monitor.run_id, 2**30)
    assert [entry.first_step for entry in spool.entries()] == list(range(20))
    out = capsys.readouterr().err
    assert f"streams to {server.url}/gradwatch/runs/{monitor.run_id}" in out
    assert "0 steps sent" in out
    assert "the server refused the run" in out


def test_an_unreachable_server_is_reported_within_seconds(tmp_path, caplog):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    x, y = _data(8)
    monitor = GradientMonitor(
        "unreachable", server=f"http://127.0.0.1:{port}", spool_dir=tmp_path, flush_every=1
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        _model().fit(x, y, batch_size=2, verbose=0, callbacks=[monitor])
        found = monitor.sender.wait_for(
            lambda: any("cannot reach the server" in r.getMessage() for r in caplog.records), 5
        )
        assert found, [r.getMessage() for r in caplog.records]
        assert time.monotonic() - started < 60  # long before the 60 s retry deadline
        assert monitor.close(timeout_seconds=0.5) is False
    warnings = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert len(warnings) == 1
    assert f"http://127.0.0.1:{port}/api/v1/runs" in warnings[0]


def test_a_closed_monitor_refuses_to_be_used_again(transport):
    x, y = _data(8)
    model = _model()
    monitor = GradientMonitor("closed", transport=transport)
    model.fit(x, y, batch_size=4, verbose=0, callbacks=[monitor])
    assert monitor.close()
    with pytest.raises(MonitorClosedError, match="was closed; a closed monitor records nothing"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[monitor])
    with pytest.raises(MonitorClosedError):
        monitor.on_step()
    with pytest.raises(MonitorClosedError):
        monitor.wrap(keras.optimizers.SGD())
    assert transport.steps() == [0, 1]


class _OwnOptimizer(keras.Model):
    """A train_step that steps an optimizer of its own, which nobody wrapped."""

    def __init__(self) -> None:
        super().__init__(name="own")
        self.dense = keras.layers.Dense(1)
        self.own_optimizer = keras.optimizers.SGD(0.01)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(self(x) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.own_optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def test_a_fit_that_records_no_step_warns_with_the_fix_and_the_server_says_no_data(
    server, tmp_path, caplog
):
    import httpx

    x, y = _data(8)
    model = _OwnOptimizer()
    model.compile(optimizer="sgd")
    monitor = GradientMonitor("nothing", server=server.url, spool_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[monitor])
    warnings = [r.getMessage() for r in caplog.records if "recorded no step" in r.getMessage()]
    assert len(warnings) == 1
    assert "ran 2 batches" in warnings[0]
    assert "self.own_optimizer = monitor.wrap(own_optimizer)" in warnings[0]
    assert monitor.close()
    health = httpx.get(f"{server.url}/api/v1/runs/{monitor.run_id}/health").json()
    assert health["verdict"] == "no_data"


def test_the_fix_the_warning_gives_records_every_step(transport):
    x, y = _data(8)
    model = _OwnOptimizer()
    model.compile(optimizer="sgd")  # the model's own optimizer stays unused and unwrapped
    monitor = GradientMonitor("fixed", transport=transport)
    model.own_optimizer = monitor.wrap(model.own_optimizer)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[monitor])
    assert monitor.close()
    assert transport.steps() == [0, 1, 2, 3]
    assert monitor.layers == ("own/dense",)
    # Its train_step updates no loss metric and never calls record_loss: no loss, said as
    # "unknown" (a returned logs["loss"] is often a tracker's running mean, so it is not used).
    assert not transport.column("loss_known").any()
