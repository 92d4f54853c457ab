"""Sender: never blocks the caller, retries by the rules, counts what it drops."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest

from gradwatch.agent.records import StepBatch
from gradwatch.agent.sender import DropReason, RetryPolicy, Sender
from gradwatch.agent.transport import RejectedError, RetryableError, RunInfo

RUN = RunInfo(run_id="00000000-0000-4000-8000-000000000000", name="r", project="p")


def _batch(first_step: int = 0) -> StepBatch:
    return StepBatch(
        layers=("a",),
        step=np.array([first_step], np.int64),
        loss=np.zeros(1, np.float32),
        loss_known=np.zeros(1, bool),
        global_norm=np.ones(1, np.float32),
        global_norm_clipped=np.ones(1, np.float32),
        clip_coef=np.ones(1, np.float32),
        skipped=np.zeros(1, bool),
        grad_norm=np.ones((1, 1), np.float32),
        nonfinite=np.zeros((1, 1), np.int64),
    )


class ScriptedTransport:
    """Fails each call with the next scripted error, then succeeds."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.errors = list(errors or [])
        self.calls: list[str] = []
        self.batches: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.gate.set()

    def _call(self, name: str) -> None:
        self.gate.wait(10)
        self.calls.append(name)
        if self.errors:
            raise self.errors.pop(0)

    def create_run(self, run: RunInfo) -> None:
        self._call("create_run")

    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None:
        self._call("send_batch")
        self.batches.append(batch)

    def set_status(self, run_id: str, status: str) -> None:
        self._call(f"status:{status}")

    def close(self) -> None:
        self.gate.set()


def _sender(transport, **kwargs) -> Sender:
    kwargs.setdefault(
        "retry",
        RetryPolicy(initial_backoff_seconds=0.001, max_backoff_seconds=0.002, deadline_seconds=5.0),
    )
    return Sender(transport, RUN, rng=random.Random(0), **kwargs)


def test_sender_creates_run_then_sends_batches_then_status_in_order():
    transport = ScriptedTransport()
    sender = _sender(transport)
    assert sender.submit(_batch(0))
    assert sender.submit(_batch(1))
    sender.set_status("finished")
    assert sender.close(timeout_seconds=5)
    assert transport.calls == ["create_run", "send_batch", "send_batch", "status:finished"]
    assert sender.sent_batches == 2


def test_sender_retries_transient_errors_until_delivered():
    transport = ScriptedTransport([RetryableError("refused"), RetryableError("503")])
    sender = _sender(transport)
    sender.submit(_batch())
    assert sender.close(timeout_seconds=5)
    assert transport.calls == ["create_run", "create_run", "create_run", "send_batch"]
    assert sender.dropped_batches == {}


def test_sender_honours_retry_after():
    waits: list[float] = []
    transport = ScriptedTransport([RetryableError("429", retry_after_seconds=0.05)])
    sender = _sender(transport)
    original = sender._abort.wait

    def recording_wait(timeout: float) -> bool:
        waits.append(timeout)
        return original(timeout)

    sender._abort.wait = recording_wait  # type: ignore[method-assign]
    sender.submit(_batch())
    assert sender.close(timeout_seconds=5)
    assert waits == [0.05]


def test_sender_never_retries_a_rejection_and_counts_it():
    transport = ScriptedTransport()
    sender = _sender(transport)
    sender.submit(_batch(0))
    sender.flush(5)
    transport.errors.append(RejectedError("422 bad field", 422))
    sender.submit(_batch(1))
    sender.submit(_batch(2))
    assert sender.close(timeout_seconds=5)
    assert transport.calls.count("send_batch") == 3
    assert sender.dropped_batches == {DropReason.REJECTED: 1}
    # The count travels with the next batch.
    assert transport.batches[-1]["dropped_batches"] == {DropReason.REJECTED: 1}


def test_sender_gives_up_at_deadline_and_counts_server_unavailable():
    clock = iter(np.arange(0.0, 1000.0, 1.0))
    transport = ScriptedTransport([RetryableError("down")] * 100)
    sender = Sender(
        transport,
        RUN,
        retry=RetryPolicy(0.001, 0.001, deadline_seconds=3.0),
        clock=lambda: float(next(clock)),
        rng=random.Random(0),
    )
    sender.submit(_batch())
    sender.flush(5)
    assert sender.dropped_batches == {DropReason.SERVER_UNAVAILABLE: 1}
    sender.close(1)


def test_sender_submit_never_blocks_and_drops_when_queue_full():
    transport = ScriptedTransport()
    transport.gate.clear()  # the transport hangs
    sender = _sender(transport, queue_size=2)
    results = [sender.submit(_batch(i)) for i in range(5)]
    # One batch may already be in the hands of the (blocked) thread.
    assert results[:2] == [True, True]
    assert results.count(False) >= 2
    assert sender.dropped_batches[DropReason.QUEUE_FULL] == results.count(False)
    assert not sender.close(timeout_seconds=0.2)
    assert sender.dropped_batches.get(DropReason.SHUTDOWN, 0) >= 1


@pytest.mark.parametrize("header", ["3", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_parse_retry_after_accepts_seconds_and_dates(header):
    from gradwatch.agent.transport import parse_retry_after

    value = parse_retry_after(header, now=1445412478.0)
    assert value == pytest.approx(3.0 if header == "3" else 2.0)
