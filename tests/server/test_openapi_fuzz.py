"""schemathesis against the OpenAPI spec, with every check it has (not only "no 5xx").

Runs against a real server on 127.0.0.1 (``EmbeddedServer``) that requires a token, bounded
by example count (never by wall-clock time): ``_EXAMPLES`` cases per operation and backend,
positive and negative ones. Path ``run_id``s are replaced by a run that exists (with data),
so the batch, layer and series handlers run past their 404 checks. The token is sent with
every case, so ``ignored_auth`` can check that leaving it out (or spoiling it) is refused.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gradwatch.server.auth import TokenScope, create_token
from gradwatch.server.config import Settings
from gradwatch.server.embedded import EmbeddedServer
from gradwatch.server.store.db import Database, create_db_engine
from tests.server.wire import create_run, make_batch, post_batch

_EXAMPLES = 30


@pytest.fixture
def fuzz_token(database_url):
    engine = create_db_engine(database_url)
    try:
        with Database(engine).write_session() as session:
            scopes = (TokenScope.INGEST, TokenScope.READ)
            return create_token(session, "default", scopes, "fuzz", datetime.now(UTC)).token
    finally:
        engine.dispose()


@pytest.fixture
def fuzz_server(database_url, fuzz_token):
    """A real server with one run holding data; yields (base URL, run id, auth headers)."""
    # Both rate limits off: hundreds of requests with one token (and ignored_auth's spoiled
    # tokens from one address) would otherwise get 429s, which says nothing about the spec.
    options = Settings(
        database_url=database_url, rate_limit_per_second=0, auth_failure_rate_per_second=0
    )
    headers = {"Authorization": f"Bearer {fuzz_token}"}
    with (
        EmbeddedServer(options) as server,
        httpx.Client(base_url=server.url, headers=headers) as client,
    ):
        run_id = create_run(client, name="fuzz")
        post_batch(client, run_id, make_batch(list(range(10)), layers=["dense", "dense_1"]))
        yield server.url, run_id, headers


@pytest.fixture
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server[0]}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


_RULE_CODES = ("invalid_query", "invalid_batch")
_ACCEPTED = (401, 403, 404, 409)


def positive_data_accepted_unless_a_rule(ctx, response, case):
    """``positive_data_acceptance``, less the 422s of rules JSON Schema cannot state.

    The one built-in check left out is ``positive_data_acceptance``: it wants every
    schema-valid request accepted, but some rules span fields or need stored state, which the
    spec cannot express: a ``cursor`` must be one the server returned; ``layer`` goes with
    per-layer metrics only; a batch's columns hold one value per step; a detector override
    must leave ``reject_z`` ≤ ``z_threshold``; free-form ``config`` has depth and size
    limits. Such a refusal is a 422 with code ``invalid_query`` / ``invalid_batch``, or
    ``invalid`` whose errors are all ``value_error`` (raised by a model's validator). Any other
    refusal of valid data (a type, format, JSON or media-type error; a 400 or 415) still fails.
    """
    del ctx
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if 200 <= status < 300 or status in _ACCEPTED:
        return None
    reply = response.json() if status == 422 else {}
    errors = reply.get("errors") or []
    if reply.get("code") in _RULE_CODES or (
        reply.get("code") == "invalid"
        and errors
        and all(e["type"] == "value_error" for e in errors)
    ):
        return None
    raise AssertionError(f"schema-valid request refused: {status} {response.text[:500]}")


def _is_uuid(value):
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


@schema.parametrize()
@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_openapi_fuzz_passes_every_check(case, fuzz_server):
    _, run_id, auth = fuzz_server
    # A generated uuid becomes the run with data; a malformed one (a negative case) stays.
    if _is_uuid((case.path_parameters or {}).get("run_id", "-")):
        case.path_parameters["run_id"] = run_id
    # Negative headers (Authorization malformed or left out) are sent as generated: 401.
    negative_headers = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
    sent = {key.lower() for key in case.headers or {}}
    case.call_and_validate(
        headers=None if negative_headers or "authorization" in sent else auth,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[positive_data_accepted_unless_a_rule],
    )
