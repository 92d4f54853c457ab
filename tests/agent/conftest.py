"""The agent tests' transport: records what it is given (``tests.fakes.RecordingTransport``)."""

from __future__ import annotations

import pytest

from tests.fakes import RecordingTransport


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()
