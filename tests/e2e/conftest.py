"""A real uvicorn server on a free 127.0.0.1 port, with its own SQLite file."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer


@pytest.fixture
def server(tmp_path) -> Iterator[EmbeddedServer]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'gradwatch.db'}")
    with EmbeddedServer(settings) as running:
        yield running


@pytest.fixture
def api(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        yield client
