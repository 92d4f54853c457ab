"""schemathesis against the OpenAPI spec: whatever it sends, the server never answers 5xx.

Runs against a real server on 127.0.0.1 (``EmbeddedServer``), bounded by example count
(never by wall-clock time): ``_EXAMPLES`` cases per operation and backend. Path ``run_id``s
are replaced by a run that exists (with data), so the batch, layer and series handlers run
past their 404 checks.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from gradwatch.server.embedded import EmbeddedServer
from tests.server.wire import create_run, make_batch, post_batch

_EXAMPLES = 30


@pytest.fixture
def fuzz_server(settings):
    """A real server with one run holding data; yields (base URL, run id)."""
    with EmbeddedServer(settings) as server, httpx.Client(base_url=server.url) as client:
        run_id = create_run(client, name="fuzz")
        post_batch(client, run_id, make_batch(list(range(10)), layers=["dense", "dense_1"]))
        yield server.url, run_id


@pytest.fixture
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server[0]}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_openapi_fuzz_never_answers_5xx(case, fuzz_server):
    if case.path_parameters and "run_id" in case.path_parameters:
        case.path_parameters["run_id"] = fuzz_server[1]
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
