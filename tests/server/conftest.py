"""Fixtures: a fresh server app per test, on SQLite and on a real PostgreSQL server.

Every test that asks for ``client``, ``settings``, ``database_url`` or ``make_database_url``
runs twice, ``[sqlite]`` and ``[postgresql]``. The PostgreSQL server is started once per
session on 127.0.0.1 (see ``tests/server/postgres.py``); each test gets its own database,
copied from a template that is already migrated, and dropped afterwards. Without PostgreSQL
binaries the ``[postgresql]`` tests are skipped, unless ``GRADWATCH_REQUIRE_POSTGRES=1`` (CI),
which makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from gradwatch.server.store.db import upgrade_database
from tests.server.postgres import REQUIRE_ENV, PostgresCluster, find_postgres_bin

_TEMPLATE = "gw_template"


@dataclass(frozen=True)
class PostgresServer:
    """The session's PostgreSQL server and the name of its migrated template database."""

    cluster: PostgresCluster
    template: str


def skip_or_fail_without_postgres(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``GRADWATCH_REQUIRE_POSTGRES=1`` (as CI sets)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (skip or fail when missing)."""
    bin_dir = find_postgres_bin()
    reason = None
    if bin_dir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl) not found; "
            "install them with: apt-get install postgresql"
        )
    elif importlib.util.find_spec("psycopg") is None:
        reason = "psycopg 3 not installed: pip install -e '.[all,dev]'"
    if reason is not None or bin_dir is None:
        skip_or_fail_without_postgres(reason or "PostgreSQL unavailable")
    with PostgresCluster(bin_dir) as cluster:
        upgrade_database(cluster.create_database(name=_TEMPLATE))
        yield PostgresServer(cluster, _TEMPLATE)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with the current schema, copied by tests that want a migrated database."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test: ``sqlite`` or ``postgresql``."""
    return str(request.param)


MakeDatabaseUrl = Callable[..., str]


@pytest.fixture
def make_database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MakeDatabaseUrl]:
    """A factory of fresh databases of the backend under test, dropped after the test.

    ``make_database_url()`` returns the URL of a new database with the current schema;
    ``make_database_url(migrated=False)`` one with no tables at all.
    """
    created: list[str] = []
    server: PostgresServer | None = None

    def make(*, migrated: bool = True) -> str:
        nonlocal server
        if backend == "sqlite":
            path = tmp_path / f"gradwatch-{len(created)}.db"
            created.append(str(path))
            if migrated:
                shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
            return f"sqlite:///{path}"
        if server is None:
            server = request.getfixturevalue("postgres")
        url = server.cluster.create_database(template=server.template if migrated else None)
        created.append(url.rsplit("/", 1)[1])
        return url

    yield make
    if server is not None:
        for name in created:
            server.cluster.drop_database(name)


@pytest.fixture
def database_url(make_database_url: MakeDatabaseUrl) -> str:
    """URL of a fresh, migrated database of the backend under test."""
    return make_database_url()


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Settings pointing at the test's own database."""
    return Settings(database_url=database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A started app (lifespan run: database migrated), in open mode (no tokens)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
