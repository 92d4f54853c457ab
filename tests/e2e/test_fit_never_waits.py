"""``model.fit`` never waits on delivery, even to a server that accepts and never answers.

Issue 15 item 7: in 4 of 16 outage runs ``fit`` seemed to return ~40 s after its last step.
``tests/e2e/test_delivery.py`` already fits against a transport that blocks forever; this test
uses the real HTTP transport against a "black hole" on 127.0.0.1 (it accepts connections and
reads requests but never answers), with a request timeout far longer than the fit. If ``fit``
(or a callback) ever waited on delivery, the client would give up on its request before
``fit`` returned, which the black hole sees as the connection closing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from gradwatch.agent import GradientMonitor
from tests.e2e.test_delivery import AtStep, _fit
from tests.server_process import WAIT_SECONDS

pytestmark = pytest.mark.e2e


class BlackHole:
    """A TCP server that reads every request and never answers (bounded by :meth:`close`)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.received = threading.Event()
        self.client_gave_up = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            reader = threading.Thread(target=self._read, args=(connection,), daemon=True)
            self._threads.append(reader)
            reader.start()

    def _read(self, connection: socket.socket) -> None:
        connection.settimeout(0.1)
        with connection:
            while not self._stop.is_set():
                try:
                    data = connection.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:  # the client closed its end: it stopped waiting
                    self.client_gave_up.set()
                    return
                self.received.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(WAIT_SECONDS)


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()


def test_fit_never_waits_on_a_server_that_never_answers(black_hole, tmp_path):
    monitor = GradientMonitor(
        run="silent-server",
        server=black_hole.url,
        flush_every=3,
        request_timeout_seconds=WAIT_SECONDS,
        retry_deadline_seconds=WAIT_SECONDS,
        spool_dir=tmp_path / "spool",
    )
    try:
        # From step 1 on, a request of the sender hangs in the black hole.
        _fit(monitor, 4, AtStep({1: lambda: black_hole.received.wait(WAIT_SECONDS)}))  # 20 steps

        assert black_hole.received.is_set()
        assert not black_hole.client_gave_up.is_set()  # fit returned while it still waited
        assert monitor.sender.accepted_steps == 20
        assert monitor.sender.sent_batches == 0
        assert not monitor.sender.idle
        assert not monitor.close(timeout_seconds=0.05)  # bounded, and says nothing was delivered
        assert monitor.sender.spooled_batches > 0  # what waited is kept for later
    finally:
        monitor.close(timeout_seconds=0.05)
