"""Wire floats are stored as float32: a finite value beyond its range is refused, not stored as
Infinity (``"global_norm": [1e300]`` was a 200 that read back ``"Infinity"`` and raised
critical events), and a JSON ``1e400`` is not read as Infinity either."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.server.wire import create_run, get_series, make_batch, post_batch

_F32_MAX = float(np.finfo(np.float32).max)


def _with(field, literal):
    """A batch whose ``field`` holds ``literal`` (raw JSON text) at step 0."""
    body = make_batch([0, 1], ["a"])
    body[field] = "__VALUE__"
    placeholder = {
        "grad_norm": "[[__V__], [1.0]]",
        "loss": "[__V__, 0.5]",
    }.get(field, "[__V__, 1.0]")
    text = json.dumps(body).replace('"__VALUE__"', placeholder.replace("__V__", literal))
    return text.encode()


@pytest.mark.parametrize("field", ["global_norm", "grad_norm", "loss"])
@pytest.mark.parametrize("literal", ["1e300", "-1e300", "1e400", "-1e400", "3.4028236e38"])
def test_float_range_beyond_float32_is_422_and_says_how_to_send_infinity(client, field, literal):
    run_id = create_run(client)

    response = post_batch(client, run_id, _with(field, literal))

    assert response.status_code == 422, response.text
    reply = response.json()
    assert reply["code"] == "invalid"
    assert reply["errors"][0]["loc"][:2] == ["body", field]
    assert reply["detail"].startswith(f"{field}.")
    assert "float32" in reply["detail"]
    assert "3.4028235e+38" in reply["detail"]
    assert "'Infinity'" in reply["detail"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 0
    assert client.get(f"/api/v1/runs/{run_id}/events").json()["events"] == []


def test_float_range_edges_and_infinity_strings_are_stored_exactly(client):
    run_id = create_run(client)
    body = make_batch([0, 1, 2], ["a"], global_norm=[_F32_MAX, float("inf"), 1e-30])
    body["clip_coef"] = [-_F32_MAX, "-Infinity", "NaN"]

    assert post_batch(client, run_id, body).status_code == 200

    assert get_series(client, run_id, "global_norm")["value"] == [
        _F32_MAX,
        "Infinity",
        pytest.approx(1e-30, rel=1e-6),
    ]
    assert get_series(client, run_id, "clip_coef")["value"] == [-_F32_MAX, "-Infinity", "NaN"]
