"""Fixtures: a fresh server app on a temporary SQLite file per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings pointing at a SQLite file in the test's temporary directory."""
    return Settings(database_url="sqlite:///" + str(tmp_path / "x.db"))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A started app (lifespan run: database created and migrated)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
