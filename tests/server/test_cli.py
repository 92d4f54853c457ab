"""The ``gradwatch`` commands ``db upgrade``, ``token`` and the bind rules of ``server``."""

from __future__ import annotations

import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gradwatch.server.app import create_app
from gradwatch.server.cli import app
from gradwatch.server.config import Settings
from tests.server.schema import head_revision, stored_revisions

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_cli_db_upgrade_creates_the_schema(make_database_url):
    url = make_database_url(migrated=False)

    result = _invoke("db", "upgrade", "--database-url", url)

    assert result.exit_code == 0, result.output
    assert stored_revisions(url) == [head_revision()]


def test_cli_token_create_prints_a_working_token_once(database_url):
    result = _invoke(
        "token", "create", "--project", "vision", "--scope", "read", "--database-url", database_url
    )

    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("gw_")
    assert "\n" not in token
    listed = _invoke("token", "list", "--database-url", database_url)
    assert token.split("_")[1] in listed.stdout
    assert token not in listed.stdout

    with TestClient(create_app(Settings(database_url=database_url))) as client:
        assert (
            client.get("/api/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code
            == 200
        )
        assert client.get("/api/v1/runs").status_code == 401


def test_cli_token_create_rejects_bad_scope_and_project(database_url):
    bad_scope = _invoke(
        "token", "create", "--project", "p", "--scope", "admin", "--database-url", database_url
    )
    bad_project = _invoke(
        "token", "create", "--project", "a b", "--scope", "read", "--database-url", database_url
    )
    assert bad_scope.exit_code == 2
    assert "scope" in bad_scope.output
    assert bad_project.exit_code == 2
    assert "project" in bad_project.output


def test_cli_token_revoke(database_url):
    token = _invoke(
        "token", "create", "--project", "p", "--scope", "ingest", "--database-url", database_url
    ).stdout.strip()
    key = token.split("_")[1]

    first = _invoke("token", "revoke", key, "--database-url", database_url)
    again = _invoke("token", "revoke", key, "--database-url", database_url)

    assert first.exit_code == 0
    assert again.exit_code == 1


def _capture_serve(monkeypatch):
    served = []
    monkeypatch.setattr(
        uvicorn,
        "run",
        lambda application, host, port: served.append((application.state.settings, host)),
    )
    return served


def test_cli_server_refuses_open_mode_off_loopback(database_url, monkeypatch):
    served = _capture_serve(monkeypatch)

    refused = _invoke("server", "--host", "0.0.0.0", "--database-url", database_url)
    insecure = _invoke("server", "--host", "0.0.0.0", "--insecure", "--database-url", database_url)
    loopback = _invoke("server", "--host", "127.0.0.1", "--database-url", database_url)

    assert refused.exit_code == 2
    assert "--insecure" in refused.output
    assert insecure.exit_code == 0
    assert loopback.exit_code == 0
    assert [(settings.require_auth, host) for settings, host in served] == [
        (False, "0.0.0.0"),
        (False, "127.0.0.1"),
    ]


def test_cli_server_with_tokens_requires_them_off_loopback(database_url, monkeypatch):
    served = _capture_serve(monkeypatch)
    _invoke("token", "create", "--project", "p", "--scope", "read", "--database-url", database_url)

    result = _invoke(
        "server", "--host", "0.0.0.0", "--rate-limit", "5", "--database-url", database_url
    )

    assert result.exit_code == 0, result.output
    settings, _ = served[0]
    assert settings.require_auth is True
    assert settings.rate_limit_per_second == 5
