"""The PostgreSQL test fixture: skipped where missing, a failure where CI requires it."""

from __future__ import annotations

import pytest

from gradwatch.server.store.db import create_db_engine
from tests.server.conftest import skip_or_fail_without_postgres
from tests.server.postgres import REQUIRE_ENV


def test_postgres_missing_is_a_skip_outside_ci(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no initdb"):
        skip_or_fail_without_postgres("no initdb")


def test_postgres_missing_is_a_failure_when_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="forbids skipping"):
        skip_or_fail_without_postgres("no initdb")


def test_postgres_fixture_serves_real_databases(postgres):
    url = postgres.cluster.create_database()
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SHOW server_version").scalar_one()
        assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert int(version.split(".")[0]) >= 13
    finally:
        engine.dispose()
        postgres.cluster.drop_database(url.rsplit("/", 1)[1])
