"""Sender: never blocks the caller, retries by the rules, spools, counts what it drops.

Time in these tests is a :class:`FakeClock`: every wait of the sender thread
returns at once and moves the clock forward, so backoff, ``Retry-After`` and
deadlines are checked exactly and nothing sleeps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradwatch.agent import lifecycle
from gradwatch.agent.lifecycle import close_at_exit
from gradwatch.agent.records import OutgoingBatch, as_wire
from gradwatch.agent.sender import DropReason, Sender
from gradwatch.agent.spool import Spool, SpoolState
from gradwatch.agent.transport import RejectedError, RetryableError, RetryPolicy, RunInfo
from tests.fakes import step_batch

RUN = RunInfo(run_id="00000000-0000-4000-8000-000000000000", name="r", project="p")
ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """Time that moves only when the sender waits; a timed wait returns at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wait(self, condition: threading.Condition, timeout_seconds: float | None) -> None:
        if timeout_seconds is None:
            condition.wait()  # nothing to do until notified
            return
        self.waits.append(timeout_seconds)
        self.now += timeout_seconds


class ScriptedTransport:
    """Fails each call with the next scripted error, then succeeds; ``gate`` holds calls."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.errors = list(errors or [])
        self.calls: list[str] = []
        self.batches: list[dict[str, Any]] = []
        self.call_times: list[float] = []
        self.clock: FakeClock | None = None
        self.down = False  # while True, every call fails as if the server were unreachable
        self.gate = threading.Event()
        self.gate.set()

    def _call(self, name: str) -> None:
        self.gate.wait(10)
        self.calls.append(name)
        if self.clock is not None:
            self.call_times.append(self.clock.now)
        if self.down:
            raise RetryableError("connection refused")
        if self.errors:
            raise self.errors.pop(0)

    def create_run(self, run: RunInfo) -> None:
        self._call("create_run")

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        self._call("send_batch")
        self.batches.append(as_wire(batch))

    def set_status(self, run_id: str, status: str) -> None:
        self._call(f"status:{status}")

    def close(self) -> None:
        self.gate.set()

    def steps(self) -> list[int]:
        return [s for b in self.batches for s in b["step"]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def senders():
    """Collects the senders a test makes and closes every one of them."""
    made: list[Sender] = []
    yield made
    for sender in made:
        sender.close(timeout_seconds=5)


@pytest.fixture
def make_sender(senders, clock):
    def make(transport, **kwargs) -> Sender:
        kwargs.setdefault("retry", RetryPolicy(1.0, 4.0, deadline_seconds=30.0))
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("rng", random.Random(0))
        transport.clock = kwargs["clock"]
        sender = Sender(transport, RUN, **kwargs)
        senders.append(sender)
        return sender

    return make


def _spool_root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def _spool(tmp_path: Path, max_bytes: int = 2**30) -> Spool:
    return Spool(_spool_root(tmp_path), RUN.run_id, max_bytes)


# -- delivery and retry rules --------------------------------------------------------------


def test_sender_creates_run_then_sends_batches_then_status_in_order(make_sender):
    transport = ScriptedTransport()
    sender = make_sender(transport)
    assert sender.submit(step_batch(0))
    assert sender.submit(step_batch(1))
    sender.set_status("finished")
    assert sender.close(timeout_seconds=5)
    assert transport.calls == ["create_run", "send_batch", "send_batch", "status:finished"]
    assert sender.sent_batches == 2
    assert sender.accepted_steps == 2


def test_sender_retries_transient_errors_until_delivered(make_sender):
    transport = ScriptedTransport([RetryableError("refused"), RetryableError("503")])
    sender = make_sender(transport)
    sender.submit(step_batch())
    assert sender.close(timeout_seconds=5)
    assert transport.calls == ["create_run", "create_run", "create_run", "send_batch"]
    assert sender.dropped_batches == {}


def test_sender_honours_retry_after(make_sender, clock):
    transport = ScriptedTransport(
        [RetryableError("429", retry_after_seconds=7.0), RetryableError("503", 2.5)]
    )
    sender = make_sender(transport)
    sender.submit(step_batch())
    assert sender.flush(timeout_seconds=5)
    assert clock.waits == [7.0, 2.5]
    assert transport.call_times == [0.0, 7.0, 9.5, 9.5]


def test_sender_backs_off_exponentially_with_full_jitter(make_sender, clock):
    policy = RetryPolicy(initial_backoff_seconds=1.0, max_backoff_seconds=4.0, deadline_seconds=1e6)
    transport = ScriptedTransport([RetryableError("503")] * 6)
    sender = make_sender(transport, retry=policy, rng=random.Random(42))
    sender.submit(step_batch())
    assert sender.flush(timeout_seconds=5)
    expected_rng = random.Random(42)
    expected = [policy.backoff_seconds(attempt, expected_rng) for attempt in range(6)]
    assert clock.waits == pytest.approx(expected)
    for attempt, wait in enumerate(clock.waits):
        assert 0.0 <= wait <= min(4.0, 2.0**attempt)


def test_sender_never_retries_a_rejection_logs_it_once_and_counts_it(make_sender, caplog):
    transport = ScriptedTransport()
    sender = make_sender(transport)
    sender.submit(step_batch(0))
    assert sender.flush(5)
    transport.errors += [RejectedError("422 bad field", 422), RejectedError("422 again", 422)]
    with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
        for step in (1, 2, 3):
            sender.submit(step_batch(step))
        assert not sender.close(timeout_seconds=5)  # delivered, but not everything
    assert transport.calls.count("send_batch") == 4
    assert sender.dropped_batches == {DropReason.REJECTED: 2}
    assert [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()] == [
        "gradwatch: the server rejected a request; not retrying: 422 bad field"
    ]
    # The count travels with the next batch.
    assert transport.batches[-1]["dropped_batches"] == {DropReason.REJECTED: 2}


class OldServerTransport(ScriptedTransport):
    """A server from before incident announcements: extra fields are a 422 naming them."""

    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None:
        if "incidents" in as_wire(batch):
            self.calls.append("send_batch")
            raise RejectedError(
                "POST /api/v1/runs/x/batches: HTTP 422: incidents: Extra inputs are not permitted",
                422,
            )
        super().send_batch(run_id, batch)


def test_a_server_without_incident_announcements_still_gets_every_step(make_sender, caplog):
    transport = OldServerTransport()
    sender = make_sender(transport)
    note = {"step": 1, "cause": "nonfinite", "path": "/runs/incidents/r/step-1", "host": "h"}
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        sender.submit(dataclasses.replace(step_batch(1), incidents=(note,)))
        closed = sender.close(timeout_seconds=5)
    assert closed, (transport.calls, sender.dropped_batches, caplog.text)
    assert [b["step"] for b in transport.batches] == [[1]]
    assert "incidents" not in transport.batches[0]
    assert sender.dropped_batches == {}
    warnings = [
        r.getMessage() for r in caplog.records if "incident announcements" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "/runs/incidents/r/step-1" in warnings[0]


def test_sender_keeps_every_batch_when_the_server_refuses_the_run(make_sender, tmp_path, caplog):
    # A wrong server path or token: run creation answers 404/401. That is a configuration
    # error: said at once with the URL and the server's message, nothing counted as rejected,
    # everything kept in the spool, and close() says it did not deliver.
    refusal = RejectedError('POST http://127.0.0.1:1/api/v1/api/v1/runs: HTTP 404: {"detail"}', 404)

    class WrongPath(ScriptedTransport):
        def create_run(self, run: RunInfo) -> None:
            self._call("create_run")
            raise refusal

    transport = WrongPath()
    sender = make_sender(transport, spool=_spool(tmp_path), clock=None)
    with caplog.at_level(logging.ERROR, logger="gradwatch.agent"):
        for step in range(5):
            sender.submit(step_batch(step))
        sender.set_status("finished")
        assert not sender.flush(0.5)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert "refused to create run" in errors[0]
        assert "http://127.0.0.1:1/api/v1/api/v1/runs: HTTP 404" in errors[0]
        assert "without /api/v1" in errors[0]
        assert not sender.close(timeout_seconds=0.5)
    assert sender.run_rejected is not None
    assert "HTTP 404" in sender.run_rejected
    assert DropReason.REJECTED not in sender.dropped_batches
    assert "send_batch" not in transport.calls
    spool = _spool(tmp_path)
    assert len(spool) == 5
    assert spool.load_state().status == "finished"


def test_sender_reports_an_outage_once_at_its_start_and_once_at_its_end(make_sender, caplog):
    transport = ScriptedTransport([RetryableError("POST http://127.0.0.1:9/: ConnectError")] * 3)
    sender = make_sender(transport)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for step in range(3):
            sender.submit(step_batch(step))
        assert sender.close(timeout_seconds=5)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("gradwatch: cannot reach the server (POST http://127.0.0.1:9/")
    assert "30 s" in messages[0]
    assert messages[1] == "gradwatch: the server answers again; delivery resumed"
    assert transport.steps() == [0, 1, 2]


def test_sender_gives_up_at_deadline_and_counts_server_unavailable_without_spool(
    make_sender, clock
):
    transport = ScriptedTransport([RetryableError("down")] * 1000)
    sender = make_sender(transport, retry=RetryPolicy(1.0, 1.0, deadline_seconds=3.0))
    sender.submit(step_batch())
    assert sender.flush(5)
    assert sender.dropped_batches == {DropReason.SERVER_UNAVAILABLE: 1}
    assert clock.now <= 3.0
    assert sum(clock.waits) <= 3.0


def test_sender_submit_never_blocks_and_drops_when_queue_full(make_sender):
    transport = ScriptedTransport()
    transport.gate.clear()  # the transport hangs
    sender = make_sender(transport, queue_size=2)
    results = [sender.submit(step_batch(i)) for i in range(5)]
    # One batch may already be in the hands of the (blocked) thread.
    assert results[:2] == [True, True]
    assert results.count(False) >= 2
    assert sender.dropped_batches[DropReason.QUEUE_FULL] == results.count(False)
    assert not sender.close(timeout_seconds=0.05)
    assert sender.dropped_batches.get(DropReason.SHUTDOWN, 0) >= 1


def test_sender_submit_drops_when_queue_bytes_exceeded(make_sender):
    transport = ScriptedTransport()
    transport.gate.clear()
    one = step_batch(0, steps=10).nbytes
    sender = make_sender(transport, queue_max_bytes=2 * one)
    assert sender.submit(step_batch(0, steps=10))
    assert sender.wait_for(lambda: sender.queued_batches == 0, timeout_seconds=10)  # in flight
    results = [sender.submit(step_batch(10 * i, steps=10)) for i in (1, 2, 3)]
    assert results == [True, True, False]
    assert sender.dropped_batches == {DropReason.QUEUE_FULL: 1}
    transport.gate.set()


# -- spool ---------------------------------------------------------------------------------


def _outage(transport: ScriptedTransport, failures: int) -> None:
    """Hold the transport, then let it fail ``failures`` calls before it recovers."""
    transport.errors += [RetryableError("connection refused")] * failures


def test_sender_spools_past_the_deadline_and_replays_in_step_order(make_sender, tmp_path):
    transport = ScriptedTransport()
    transport.gate.clear()
    spool = _spool(tmp_path)
    sender = make_sender(transport, spool=spool, retry=RetryPolicy(1.0, 4.0, 3.0))
    for step in range(5):
        assert sender.submit(step_batch(step))
    _outage(transport, 40)
    transport.gate.set()
    assert sender.flush(timeout_seconds=10)
    assert transport.steps() == [0, 1, 2, 3, 4]
    assert sender.spooled_total == 5  # the first past its deadline, the rest behind it
    assert sender.dropped_batches == {}
    assert len(spool) == 0
    assert sender.close(timeout_seconds=5)
    assert not spool.directory.exists()  # an empty spool is removed at close


def test_sender_sends_a_status_set_during_an_outage_after_the_spooled_batches(
    make_sender, tmp_path
):
    transport = ScriptedTransport()
    transport.gate.clear()
    sender = make_sender(transport, spool=_spool(tmp_path), retry=RetryPolicy(1.0, 4.0, 3.0))
    sender.submit(step_batch(0))
    sender.submit(step_batch(1))
    sender.set_status("finished")
    _outage(transport, 30)
    transport.gate.set()
    assert sender.flush(timeout_seconds=10)
    delivered = [c for c in transport.calls if c != "create_run"]
    assert delivered[-3:] == ["send_batch", "send_batch", "status:finished"]
    assert transport.steps() == [0, 1]


def test_sender_drops_the_oldest_batches_over_the_spool_cap_and_reports_them(make_sender, tmp_path):
    probe = Spool(tmp_path / "probe", RUN.run_id, 2**30)
    probe.put(step_batch(0).to_wire())
    cap = int(2.5 * probe.size_bytes)  # room for two batches
    transport = ScriptedTransport()
    transport.gate.clear()
    spool = _spool(tmp_path, max_bytes=cap)
    sender = make_sender(transport, spool=spool, retry=RetryPolicy(1.0, 4.0, 3.0))
    for step in range(6):
        sender.submit(step_batch(step))
    _outage(transport, 40)
    transport.gate.set()
    assert sender.flush(timeout_seconds=10)
    assert transport.steps() == [4, 5]  # exactly the oldest four were dropped
    assert sender.dropped_batches == {DropReason.SPOOL_FULL: 4}
    assert transport.batches[0]["dropped_batches"] == {DropReason.SPOOL_FULL: 4}


def test_sender_close_spools_what_was_not_delivered_and_a_new_sender_sends_it(
    make_sender, tmp_path
):
    hung = ScriptedTransport()
    hung.gate.clear()  # the server never answers
    sender = make_sender(hung, spool=_spool(tmp_path))
    for step in range(3):
        sender.submit(step_batch(step))
    sender.set_status("finished")
    assert not sender.close(timeout_seconds=0.05)
    spool = _spool(tmp_path)
    assert [e.first_step for e in spool.entries()] == [0, 1, 2]  # in flight and queued
    state = spool.load_state()
    assert state is not None
    assert state.status == "finished"
    assert state.run == RUN

    # "Restart": a new sender for the same run sends what is left, then new batches.
    transport = ScriptedTransport()
    restarted = make_sender(transport, spool=_spool(tmp_path))
    restarted.submit(step_batch(3))
    assert restarted.flush(timeout_seconds=10)
    assert transport.steps() == [0, 1, 2, 3]
    assert "status:finished" in transport.calls
    assert restarted.dropped_batches == {}


def test_sender_continues_the_drop_counts_of_a_leftover_spool(make_sender, tmp_path):
    leftover = _spool(tmp_path)
    leftover.save_state(SpoolState(RUN, None, {DropReason.SPOOL_FULL: 3}))
    leftover.put(step_batch(10).to_wire())
    transport = ScriptedTransport()
    sender = make_sender(transport, spool=_spool(tmp_path))
    sender.submit(step_batch(11))
    assert sender.flush(timeout_seconds=10)
    assert transport.steps() == [10, 11]
    assert [b["dropped_batches"] for b in transport.batches] == [{DropReason.SPOOL_FULL: 3}] * 2


def test_sender_deletes_and_counts_an_unreadable_spool_file(make_sender, tmp_path):
    leftover = _spool(tmp_path)
    leftover.save_state(SpoolState(RUN))
    leftover.put(step_batch(1).to_wire())
    bad = leftover.directory / f"{0:020d}-{'0' * 8}-0000-4000-8000-{'0' * 12}.json.gz"
    bad.write_bytes(b"not gzip")
    transport = ScriptedTransport()
    sender = make_sender(transport, spool=_spool(tmp_path))
    assert sender.flush(timeout_seconds=10)
    assert transport.steps() == [1]
    assert sender.dropped_batches == {DropReason.SPOOL_ERROR: 1}
    assert not bad.exists()


def test_sender_flush_is_false_while_the_server_is_down(make_sender, tmp_path):
    transport = ScriptedTransport()
    transport.down = True
    sender = make_sender(transport, spool=_spool(tmp_path), retry=RetryPolicy(1.0, 1.0, 2.0))
    sender.submit(step_batch(0))
    assert sender.wait_for(lambda: sender.spooled_batches == 1, timeout_seconds=10)
    assert not sender.flush(timeout_seconds=0.01)
    transport.down = False
    assert sender.flush(timeout_seconds=10)
    assert transport.steps() == [0]


# -- process events ------------------------------------------------------------------------


def test_close_at_exit_keeps_only_a_weak_reference():
    calls: list[str] = []

    class Owner:
        def finish(self) -> None:
            calls.append("finish")

    owner = Owner()
    close_at_exit(owner.finish)
    keys = [
        key
        for key, ref in lifecycle._exit_calls.items()
        if getattr(ref(), "__self__", None) is owner
    ]
    assert len(keys) == 1
    del owner  # the last strong reference: freed at once (no cycle)
    assert keys[0] not in lifecycle._exit_calls  # collected, and forgotten
    assert calls == []


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # a safety bound: the script finishes in about a second
    )


_SCRIPT_PRELUDE = """
    import os, sys
    from pathlib import Path
    from gradwatch.agent.sender import Sender
    from gradwatch.agent.local import JsonlTransport
    from gradwatch.agent.transport import RunInfo
    from tests.fakes import step_batch as batch

    directory = Path(sys.argv[1])
"""


def test_sender_is_closed_at_interpreter_exit(tmp_path):
    script = (
        _SCRIPT_PRELUDE
        + """
    run = RunInfo("00000000-0000-4000-8000-00000000000a", "exit", "p")
    sender = Sender(JsonlTransport(directory), run)
    for step in range(3):
        sender.submit(batch(step))
    # no close(): the interpreter exits with the batches still queued
    """
    )
    result = _run_script(script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "00000000-0000-4000-8000-00000000000a.jsonl").read_text().splitlines()
    steps = [s for r in map(json.loads, lines) if r["kind"] == "batch" for s in r["batch"]["step"]]
    assert steps == [0, 1, 2]


def test_sender_restarts_cleanly_in_a_forked_child(tmp_path):
    script = (
        _SCRIPT_PRELUDE
        + """
    import threading
    parent_run = RunInfo("00000000-0000-4000-8000-00000000000b", "fork", "p")
    sender = Sender(JsonlTransport(directory), parent_run)
    sender.submit(batch(0))
    assert sender.flush(10)
    held, release = threading.Event(), threading.Event()

    def hold():
        with sender._cond:
            held.set()
            release.wait()

    # Fork while another thread holds the sender's lock: the child must not inherit a
    # lock that nobody in it will ever release.
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        try:
            ok = sender.submit(batch(1)) and sender.flush(10)
            sender.set_status("child-done")
            ok = sender.close(10) and ok
        finally:
            os._exit(0 if ok else 3)
    release.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    sender.submit(batch(2))
    assert sender.close(10)
    print("ok")
    """
    )
    result = _run_script(script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "00000000-0000-4000-8000-00000000000b.jsonl").read_text().splitlines()
    steps = sorted(
        s for r in map(json.loads, lines) if r["kind"] == "batch" for s in r["batch"]["step"]
    )
    assert steps == [0, 1, 2]  # the child did not resend the parent's batches


# -- transport rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 2.0),
        ("99999999", 3600.0),
        ("-1", None),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_retry_after_accepts_seconds_and_dates(header, seconds):
    from gradwatch.agent.transport import parse_retry_after

    assert parse_retry_after(header, now=1445412478.0) == seconds


def test_http_transport_classifies_failures_by_the_retry_rules():
    import httpx

    from gradwatch.agent.transport import HttpTransport

    replies = iter(
        [
            httpx.Response(503, headers={"Retry-After": "2"}, text="busy"),
            httpx.Response(429, text="slow down"),
            httpx.Response(422, text='{"detail": "bad field"}'),
            httpx.Response(200, json={"duplicate": True, "stored_samples": 0}),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/runs":
            raise httpx.ConnectError("refused", request=request)
        assert request.headers["Content-Encoding"] == "gzip"
        return next(replies)

    client = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
    transport = HttpTransport("http://gw", client=client)
    with pytest.raises(RetryableError, match="ConnectError"):
        transport.create_run(RUN)
    wire = step_batch().to_wire()
    with pytest.raises(RetryableError) as unavailable:
        transport.send_batch(RUN.run_id, wire)
    assert unavailable.value.retry_after_seconds == 2.0
    with pytest.raises(RetryableError) as limited:
        transport.send_batch(RUN.run_id, wire)
    assert limited.value.retry_after_seconds is None
    with pytest.raises(RejectedError, match="bad field") as rejected:
        transport.send_batch(RUN.run_id, wire)
    assert rejected.value.status_code == 422
    assert transport.post_batch(RUN.run_id, wire) == {"duplicate": True, "stored_samples": 0}
    transport.close()


def test_http_transport_sends_its_batches_binary_and_json_to_a_server_without_binary(caplog):
    """A batch made in this process goes as the binary body; a server that answers 415 to
    it (older than binary batches) gets the same batch again as JSON, and JSON from then on,
    with one warning. A wire dict (read back from the spool) goes as JSON."""
    import gzip

    import httpx

    from gradwatch.agent.transport import HttpTransport
    from gradwatch.server.api.binary_batch import parse_binary_batch
    from gradwatch.wire.binary import MEDIA_TYPE

    sent: list[tuple[str, bytes]] = []
    takes_binary = True

    def handler(request: httpx.Request) -> httpx.Response:
        kind = request.headers["Content-Type"]
        sent.append((kind, gzip.decompress(request.content)))
        if kind == MEDIA_TYPE and not takes_binary:
            return httpx.Response(415, json={"detail": "Content-Type not supported"})
        return httpx.Response(200, json={"duplicate": False})

    client = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
    transport = HttpTransport("http://gw", client=client)
    batch = step_batch(0)
    transport.send_batch(RUN.run_id, batch)
    transport.send_batch(RUN.run_id, batch.to_wire())
    assert [kind for kind, _ in sent] == [MEDIA_TYPE, "application/json"]
    assert parse_binary_batch(sent[0][1]).batch_id == batch.batch_id
    assert json.loads(sent[1][1]) == batch.to_wire()

    sent.clear()
    takes_binary = False
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        transport.send_batch(RUN.run_id, batch)
        transport.send_batch(RUN.run_id, step_batch(10))
    assert [kind for kind, _ in sent] == [MEDIA_TYPE, "application/json", "application/json"]
    assert json.loads(sent[1][1]) == batch.to_wire()
    assert [r.getMessage() for r in caplog.records if "binary" in r.getMessage()] == [
        "gradwatch: http://gw does not take binary batches (an older gradwatch server?); "
        "sending JSON, which costs the training process ~25 ms of CPU per 500-layer batch: "
        "upgrade the server"
    ]
    transport.close()


def test_local_summary_counts_clipped_skipped_and_nonfinite_steps(tmp_path):
    from gradwatch.agent.local import JsonlTransport, read_run_file

    batch = step_batch(0, steps=4)
    batch.global_norm[:] = [1.0, np.inf, np.nan, 5.0]
    batch.clip_coef[:] = [1.0, 0.0, 1.0, 0.2]
    batch.skipped[:] = [False, True, False, False]
    batch.nonfinite[:, 0] = [0, 0, 3, 0]
    transport = JsonlTransport(tmp_path)
    transport.create_run(RUN)
    transport.send_batch(RUN.run_id, batch.to_wire())
    transport.set_status(RUN.run_id, "finished")
    summary = transport.summary(RUN.run_id)
    assert (summary.steps, summary.clipped_steps, summary.skipped_steps) == (4, 2, 1)
    assert summary.nonfinite_steps == 2  # the Inf global norm and the NaN step
    assert summary.max_global_norm == np.inf
    assert "4 steps, max global norm inf, 2 clipped, 1 skipped, 2 non-finite" in (
        summary.describe("r")
    )
    record = read_run_file(transport.path_for(RUN.run_id))
    assert (record.run, record.status, record.unreadable_lines) == (RUN, "finished", 0)
    assert record.batches == [batch.to_wire()]
