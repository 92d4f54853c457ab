"""The arrows between the packages (README "Code map"), checked on every module's imports.

- ``gradwatch.wire`` imports nothing of gradwatch and no framework: both sides load it.
- The agent never imports the server, nor a server library.
- The server imports the agent only in the commands that run it: ``demo``, ``upload``,
  ``replay`` and the clipping study's training module (``server.study.train``).
- ``server.store`` knows no HTTP and no domain; the domain (detect, ingest, query, export,
  auth, errors) knows no HTTP; the routes (``server.api``) hold no SQL.
- The CLI's client commands (runs, show, check, open) talk HTTP only: no server module
  outside ``server.cli``, no SQLAlchemy, no server framework.

Imports are read with :mod:`ast` (relative ones resolved), including those inside functions
and ``TYPE_CHECKING`` blocks: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"agent": "gradwatch.agent", "server": "gradwatch.server", "wire": "gradwatch.wire"}

HTTP = ("fastapi", "starlette", "uvicorn")
SERVER_LIBRARIES = (*HTTP, "sqlalchemy", "alembic", "pydantic", "pydantic_settings", "psycopg")
DOMAIN = tuple(
    f"gradwatch.server.{name}" for name in ("detect", "ingest", "query", "export", "auth", "errors")
)
AGENT_USERS = (
    "gradwatch.server.cli.demo",
    "gradwatch.server.cli.upload",
    "gradwatch.server.cli.replay",
    "gradwatch.server.study.train",
)
SQL_IN_ROUTES = ("sqlalchemy",)
SQL_ALLOWED_IN_ROUTES = ("sqlalchemy.orm", "sqlalchemy.exc")
CLI_CLIENT = tuple(
    f"gradwatch.server.cli.{name}"
    for name in ("client", "exits", "format", "runs", "show", "check", "open")
)


def _modules() -> Iterator[tuple[str, Path]]:
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from . import x` and `from pkg import submodule` name the submodule too.
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


IMPORTS = {module: _imports(module, path) for module, path in _modules()}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(modules: tuple[str, ...], forbidden: tuple[str, ...], allowed=()) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in IMPORTS.items()
        if _under(module, modules)
        for name in names
        if _under(name, forbidden) and not _under(name, allowed)
    )


def test_import_rules_see_every_package():
    for package in PACKAGES.values():
        assert package in IMPORTS
    for package in ("store", "api", "cli", *(d.rsplit(".", 1)[1] for d in DOMAIN)):
        assert f"gradwatch.server.{package}" in IMPORTS, package
    # The resolver follows relative imports: the app reaches the store through them.
    assert any(_under(n, ("gradwatch.server.store",)) for n in IMPORTS["gradwatch.server.app"])


def test_wire_imports_nothing_of_gradwatch_nor_a_framework():
    forbidden = ("gradwatch.agent", "gradwatch.server", "tensorflow", "keras", *SERVER_LIBRARIES)
    assert _violations(("gradwatch.wire",), forbidden) == []


def test_agent_never_imports_the_server_or_its_libraries():
    assert _violations(("gradwatch.agent",), ("gradwatch.server", *SERVER_LIBRARIES)) == []


def test_server_imports_the_agent_only_in_demo_upload_replay_and_study():
    users = {
        module
        for module, names in IMPORTS.items()
        if _under(module, ("gradwatch.server",))
        and any(_under(n, ("gradwatch.agent",)) for n in names)
    }
    assert users <= set(AGENT_USERS), sorted(users - set(AGENT_USERS))


def test_store_knows_no_http_and_no_domain():
    forbidden = (
        *HTTP,
        *DOMAIN,
        "gradwatch.server.api",
        "gradwatch.server.cli",
        "gradwatch.server.app",
    )
    assert _violations(("gradwatch.server.store",), forbidden) == []


@pytest.mark.parametrize("domain", DOMAIN)
def test_domain_knows_no_http(domain):
    forbidden = (*HTTP, "gradwatch.server.api", "gradwatch.server.cli", "gradwatch.server.app")
    assert _violations((domain,), forbidden) == []


def test_routes_hold_no_sql():
    assert _violations(("gradwatch.server.api",), SQL_IN_ROUTES, SQL_ALLOWED_IN_ROUTES) == []
    assert _violations(("gradwatch.server.api",), ("gradwatch.server.store.models",)) == []


def test_cli_client_commands_talk_http_only():
    server_outside_cli = tuple(
        f"gradwatch.server.{path.stem if path.suffix else path.name}"
        for path in (ROOT / "server").iterdir()
        if path.name not in ("cli", "__init__.py", "py.typed", "__pycache__")
    )
    assert "gradwatch.server.store" in server_outside_cli
    forbidden = (*SERVER_LIBRARIES, *server_outside_cli, "gradwatch.agent")
    assert all(module in IMPORTS for module in CLI_CLIENT)
    assert _violations(CLI_CLIENT, forbidden) == []
