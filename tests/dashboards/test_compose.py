"""docker-compose.yml, Dockerfile, .dockerignore and .env.example, checked without a Docker engine.

The file's structure and every reference in it are checked here: services and health checks,
dependencies, mounted host paths and the config files behind them, named volumes, published
ports, and the variables it reads from ``.env`` (interpolated the way Compose does).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.dashboards.promql import DASHBOARDS, ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"gradwatch", "postgres", "prometheus", "alertmanager", "grafana"}
REQUIRED_SECRETS = {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
PUBLISH = "${GRADWATCH_PUBLISH_ADDRESS:-127.0.0.1}"

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(Exception):
    """A required variable (``${VAR:?message}``) is missing, as ``docker compose`` reports."""


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation over a loaded YAML document."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset_or_empty = not current if op and op.startswith(":") else current is None
        if op in (":-", "-"):
            return arg if unset_or_empty else str(current)
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(current)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return current or ""

    return _VARIABLE.sub(replace, value)


def _variables(text: str) -> dict[str, str | None]:
    """Variables referenced by ``text``: name → operator (``:?``, ``:-``, ...) or None."""
    found: dict[str, str | None] = {}
    for match in _VARIABLE.finditer(text):
        name = match.group("name") or match.group("bare")
        if name:
            found.setdefault(name, match.group("op"))
            if match.group("op") in (":?", "?"):
                found[name] = match.group("op")
    return found


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return compose


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(source, target, mode)`` of every short-syntax volume entry."""
    mounts = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        source, target, *mode = entry.split(":")
        mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind ``container_path`` through the service's bind mounts, if any."""
    wanted = PurePosixPath(container_path)
    for source, target, _ in _mounts(service):
        if source.startswith((".", "/")) and wanted.is_relative_to(target):
            return (ROOT / source / wanted.relative_to(target)).resolve()
    return None


def _flags(service: dict[str, Any]) -> dict[str, str]:
    command = service.get("command", [])
    assert isinstance(command, list), "commands are lists (no shell parsing)"
    return dict(item.split("=", 1) for item in command if item.startswith("--") and "=" in item)


def test_compose_defines_the_stack_services():
    compose = _compose()
    assert compose["name"] == "gradwatch"
    assert set(compose["services"]) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_service_has_a_healthcheck(name):
    check = _services()[name]["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in check, f"{name}: healthcheck.{key}"


def test_compose_services_wait_for_healthy_dependencies():
    services = _services()
    expected = {
        "gradwatch": {"postgres"},
        "prometheus": {"gradwatch", "alertmanager"},
        "grafana": {"prometheus"},
    }
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert set(depends) == expected.get(name, set()), name
        for dependency, condition in depends.items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency]


def test_compose_server_builds_from_the_dockerfile():
    build = _services()["gradwatch"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_bind_mounts_exist_and_are_read_only():
    mounted = []
    for name, service in _services().items():
        for source, target, mode in _mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
                assert mode == "ro", f"{name}: {source} must be mounted read-only"
                assert (ROOT / source).resolve().is_relative_to(DASHBOARDS), source
                mounted.append(target)
    assert mounted


def test_compose_named_volumes_are_declared_and_used():
    declared = set(_compose()["volumes"])
    used = {
        source
        for service in _services().values()
        for source, _, _ in _mounts(service)
        if not source.startswith((".", "/"))
    }
    assert used == declared
    assert {"postgres-data", "prometheus-data", "alertmanager-data", "grafana-data"} <= declared


def test_compose_config_files_exist_behind_the_mounts():
    services = _services()
    prometheus_config = _host_path(
        services["prometheus"], _flags(services["prometheus"])["--config.file"]
    )
    assert prometheus_config == DASHBOARDS / "prometheus" / "prometheus.yml"
    alertmanager_config = _host_path(
        services["alertmanager"], _flags(services["alertmanager"])["--config.file"]
    )
    assert alertmanager_config == DASHBOARDS / "alertmanager" / "alertmanager.yml"

    # Prometheus' rule_files resolve next to its config, inside the same mount.
    config = yaml.safe_load(prometheus_config.read_text(encoding="utf-8"))
    rules = [
        path for pattern in config["rule_files"] for path in prometheus_config.parent.glob(pattern)
    ]
    assert rules == [DASHBOARDS / "prometheus" / "rules" / "gradwatch.rules.yml"]

    grafana = services["grafana"]
    for kind, file in (("datasources", "prometheus.yml"), ("dashboards", "gradwatch.yml")):
        folder = _host_path(grafana, f"/etc/grafana/provisioning/{kind}")
        assert folder is not None, kind
        assert (folder / file).is_file(), kind
    provider = yaml.safe_load(
        (DASHBOARDS / "grafana/provisioning/dashboards/gradwatch.yml").read_text(encoding="utf-8")
    )["providers"][0]
    dashboards = _host_path(grafana, provider["options"]["path"])
    assert dashboards is not None
    assert (dashboards / "gradwatch.json").is_file()
    home = _host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARDS / "grafana" / "dashboards" / "gradwatch.json"


def test_compose_service_addresses_match_the_configs():
    prometheus = yaml.safe_load((DASHBOARDS / "prometheus/prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets["gradwatch"] == "gradwatch:8000"
    alertmanagers = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanagers == ["alertmanager:9093"]
    datasource = yaml.safe_load(
        (DASHBOARDS / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    services = _services()
    assert services["gradwatch"]["command"][:2] == ["gradwatch", "server"]
    command = services["gradwatch"]["command"]
    assert command[command.index("--port") + 1] == "8000"
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_compose_publishes_ports_on_the_configured_address_only():
    published = {}
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: {port!r}"
            assert port.startswith(f"{PUBLISH}:"), f"{name}: {port}"
            published[name] = port.removeprefix(f"{PUBLISH}:")
    assert published == {
        "gradwatch": "8000:8000",
        "prometheus": "9090:9090",
        "alertmanager": "9093:9093",
        "grafana": "3000:3000",
    }


def test_compose_holds_no_literal_password():
    text = COMPOSE.read_text(encoding="utf-8")
    for name, service in _services().items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key}"
    url = _services()["gradwatch"]["environment"]["GRADWATCH_DATABASE_URL"]
    assert re.fullmatch(
        r"postgresql\+psycopg://gradwatch:\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres:5432/gradwatch",
        url,
    )
    assert not re.search(r"(?i)password[\"']?\s*[:=]\s*[\"']?(?!\$\{)\w", text)


def test_compose_requires_the_passwords_from_env():
    compose = _compose()
    for missing in REQUIRED_SECRETS:
        env = {name: "x" for name in REQUIRED_SECRETS - {missing}}
        with pytest.raises(InterpolationError, match=missing):
            _interpolate(compose, env)
    env = {"POSTGRES_PASSWORD": "pg-secret", "GRAFANA_ADMIN_PASSWORD": "gf-secret"}
    resolved = _interpolate(compose, env)["services"]
    url = resolved["gradwatch"]["environment"]["GRADWATCH_DATABASE_URL"]
    assert url == "postgresql+psycopg://gradwatch:pg-secret@postgres:5432/gradwatch"
    assert resolved["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-secret"
    assert resolved["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "gf-secret"
    assert resolved["grafana"]["ports"] == ["127.0.0.1:3000:3000"]


def test_compose_variables_are_documented_in_env_example_without_passwords():
    variables = _variables(COMPOSE.read_text(encoding="utf-8"))
    example = _env_example()
    assert set(variables) == set(example)
    required = {name for name, op in variables.items() if op == ":?"}
    assert required == REQUIRED_SECRETS
    assert all(example[name] == "" for name in required), "ship no default password"
    assert example["GRADWATCH_PUBLISH_ADDRESS"] == "127.0.0.1"


def test_compose_images_are_pinned():
    for name, service in _services().items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image}"
        assert tag not in {"", "latest"}, f"{name}: {image}"


def test_dockerfile_installs_the_server_and_postgres_extras_only():
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms
    assert all(image == "python:3.11-slim" for image in froms)
    installs = re.findall(r"\"?\.?\[([a-z,]+)\]\"?", text)
    assert installs
    assert all(set(extras.split(",")) == {"server", "postgres"} for extras in installs)
    assert "tensorflow" not in text.lower().replace("no tensorflow", "")
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == [
        "gradwatch",
        "server",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert re.search(r"^HEALTHCHECK .*/healthz", text, re.MULTILINE | re.DOTALL)
    assert re.search(r"^USER\s+(?!root)\w+", text, re.MULTILINE)


def test_dockerfile_copies_what_the_dockerignore_lets_through():
    sources = [
        source
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
        for source in line.split()[:-1]
    ]
    # Every folder the wheel is built from (pyproject's package-dir), and nothing else.
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].values()
    assert set(sources) == {"pyproject.toml", "README.md", *package_dirs}
    assert all((ROOT / source).exists() for source in sources)
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", "exclude everything, then let through what the image needs"
    included = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert included == set(sources), "and so .env, data and tests never reach the build"
